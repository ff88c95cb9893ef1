package discovery

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"time"
)

// DefaultAPIURL is Tailscale's API.
const DefaultAPIURL = "https://api.tailscale.com"

// DefaultAPITimeout bounds one call to Tailscale's API.
const DefaultAPITimeout = 15 * time.Second

// TailscaleAPI is a minimal client of Tailscale's control-plane API
// (https://tailscale.com/api), authenticated with an API access token.
type TailscaleAPI struct {
	base    string
	tailnet string
	key     string
	// Timeout bounds each call (DefaultAPITimeout unless changed before
	// first use).
	Timeout time.Duration
	client  *http.Client
}

// NewTailscaleAPI returns a client of the API at baseURL (DefaultAPIURL if
// empty; with or without the /api/v2 suffix) for tailnet ("-" is the
// key's own tailnet; device calls do not need it) using apiKey, an API
// access token ("tskey-api-…"; surrounding white space, such as the
// newline of a key file, is ignored).
func NewTailscaleAPI(baseURL, tailnet, apiKey string) *TailscaleAPI {
	base := strings.TrimRight(strings.TrimSpace(baseURL), "/")
	if base == "" {
		base = DefaultAPIURL
	}
	base = strings.TrimSuffix(base, "/api/v2")
	if tailnet == "" {
		tailnet = "-"
	}
	return &TailscaleAPI{
		base:    base,
		tailnet: tailnet,
		key:     strings.TrimSpace(apiKey),
		Timeout: DefaultAPITimeout,
		client:  &http.Client{},
	}
}

// Tailnet is the tailnet the client was made for.
func (a *TailscaleAPI) Tailnet() string { return a.tailnet }

// DeleteDevice removes a device from its tailnet:
// DELETE /api/v2/device/{id}. id is the node's stable ID (PeerStatus.ID,
// the API's "nodeId") or its legacy numeric id. A device that is already
// gone (404) is success.
func (a *TailscaleAPI) DeleteDevice(ctx context.Context, id string) error {
	if id == "" {
		return errors.New("tailscale API: delete device: empty device id")
	}
	if a.key == "" {
		return errors.New("tailscale API: delete device: no API key (tailscale.api_key_file is empty)")
	}
	if a.Timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, a.Timeout)
		defer cancel()
	}
	u := a.base + "/api/v2/device/" + url.PathEscape(id)
	req, err := http.NewRequestWithContext(ctx, http.MethodDelete, u, nil)
	if err != nil {
		return fmt.Errorf("tailscale API: delete device %s: %w", id, err)
	}
	// Tailscale accepts the token as a bearer token or as the user of
	// basic auth; bearer also works for OAuth-issued access tokens.
	req.Header.Set("Authorization", "Bearer "+a.key)
	req.Header.Set("Accept", "application/json")
	resp, err := a.client.Do(req)
	if err != nil {
		return fmt.Errorf("tailscale API: delete device %s: %w", id, err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	switch {
	case resp.StatusCode >= 200 && resp.StatusCode < 300:
		return nil
	case resp.StatusCode == http.StatusNotFound:
		return nil // already gone
	}
	msg := apiMessage(body)
	hint := ""
	if resp.StatusCode == http.StatusUnauthorized || resp.StatusCode == http.StatusForbidden {
		hint = " (check the key in tailscale.api_key_file: API access tokens expire after at most 90 days, and the key's user must be allowed to remove devices)"
	}
	return fmt.Errorf("tailscale API: delete device %s: %s: %s%s", id, resp.Status, msg, hint)
}

// CheckKey proves the key works without changing anything: it lists the
// tailnet's devices (GET /api/v2/tailnet/{tailnet}/devices), which a key
// that may delete devices may also do. It returns how many there are.
func (a *TailscaleAPI) CheckKey(ctx context.Context) (int, error) {
	if a.key == "" {
		return 0, errors.New("tailscale API: no API key (tailscale.api_key_file is empty)")
	}
	if a.Timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, a.Timeout)
		defer cancel()
	}
	u := a.base + "/api/v2/tailnet/" + url.PathEscape(a.tailnet) + "/devices"
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return 0, fmt.Errorf("tailscale API: list devices: %w", err)
	}
	req.Header.Set("Authorization", "Bearer "+a.key)
	req.Header.Set("Accept", "application/json")
	resp, err := a.client.Do(req)
	if err != nil {
		return 0, fmt.Errorf("tailscale API: list devices: %w", err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, maxStatusBytes))
	if resp.StatusCode != http.StatusOK {
		hint := ""
		if resp.StatusCode == http.StatusUnauthorized || resp.StatusCode == http.StatusForbidden {
			hint = " (check the key in tailscale.api_key_file: API access tokens expire after at most 90 days)"
		}
		return 0, fmt.Errorf("tailscale API: list devices of tailnet %s: %s: %s%s", a.tailnet, resp.Status, apiMessage(body), hint)
	}
	var doc struct {
		Devices []json.RawMessage `json:"devices"`
	}
	if err := json.Unmarshal(body, &doc); err != nil {
		return 0, fmt.Errorf("tailscale API: list devices: unreadable answer: %w", err)
	}
	return len(doc.Devices), nil
}

// apiMessage is the "message" of a Tailscale API error body, or the body's
// start.
func apiMessage(body []byte) string {
	var e struct {
		Message string `json:"message"`
	}
	if json.Unmarshal(body, &e) == nil && e.Message != "" {
		return e.Message
	}
	return snippet(body)
}
