package haproxy

// The default haproxy.placeholder, which the golden files and these tests'
// HAProxy configs use. Servers pointing at it are kept in MAINT by the
// tests, so HAProxy runs no check toward it.
const (
	Placeholder     = "192.0.2.1"
	PlaceholderPort = 22
)
