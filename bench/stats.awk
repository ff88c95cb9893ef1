# Functions the bench scripts' summaries share. Values are kept as
# v[key, 1..nv[key]]; the scripts prepend this file to their awk program.

# sort sorts a[1..n] in place (insertion sort: a handful of runs).
function sort(a, n,    i, j, t) {
	for (i = 2; i <= n; i++) {
		t = a[i]
		for (j = i - 1; j >= 1 && a[j] > t; j--) a[j + 1] = a[j]
		a[j + 1] = t
	}
}

# median is the median of key's values.
function median(k,    a, i, n) {
	n = nv[k]
	for (i = 1; i <= n; i++) a[i] = v[k, i] + 0
	sort(a, n)
	return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
}
