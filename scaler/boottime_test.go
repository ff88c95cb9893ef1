package scaler

import (
	"testing"
	"time"
)

func TestBootMeter(t *testing.T) {
	var m bootMeter
	at := func(s int) time.Time { return t0.Add(time.Duration(s) * time.Second) }
	if got := m.times(); len(got) != 0 {
		t.Fatalf("times() of a new meter = %v; want none", got)
	}
	// Three boots of x86: launch → running → ready.
	for i, b := range []struct{ launch, run, ready int }{{0, 10, 40}, {100, 108, 130}, {200, 215, 260}} {
		id := "i-" + string(rune('a'+i))
		m.launch(id, at(b.launch))
		m.run(id, at(b.run))
		m.ready("x86", id, at(b.ready))
	}
	// Not measured: an instance the meter did not see launch (adopted, or
	// launched before a restart), and one whose running it did not see.
	m.run("i-adopted", at(300))
	m.ready("x86", "i-adopted", at(330))
	m.launch("i-norun", at(400))
	m.ready("x86", "i-norun", at(500))
	want := BootTime{Ready: 40 * time.Second, Billed: 30 * time.Second, Samples: 3}
	if got := m.times()["x86"]; got != want {
		t.Errorf("x86 = %+v; want %+v (medians of 40/30/60 s and 30/22/45 s)", got, want)
	}
	// Only the last BootSamples count.
	for i := range BootSamples {
		id := "j-" + string(rune('a'+i))
		m.launch(id, at(1000+100*i))
		m.run(id, at(1000+100*i+5))
		m.ready("x86", id, at(1000+100*i+20))
	}
	want = BootTime{Ready: 20 * time.Second, Billed: 15 * time.Second, Samples: BootSamples}
	if got := m.times()["x86"]; got != want {
		t.Errorf("x86 after %d more boots = %+v; want %+v", BootSamples, got, want)
	}
}
