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
	"sync"
	"time"

	"golang.org/x/oauth2"
	"golang.org/x/oauth2/clientcredentials"
)

// DefaultAPIURL is Tailscale's API.
const DefaultAPIURL = "https://api.tailscale.com"

// DefaultAPITimeout bounds one call to Tailscale's API.
const DefaultAPITimeout = 15 * time.Second

// TailscaleAPI is a minimal client of Tailscale's control-plane API
// (https://tailscale.com/api), authenticated either with an API access
// token or with an OAuth client whose access tokens it fetches itself.
type TailscaleAPI struct {
	base    string
	tailnet string
	key     string
	// oauth is set for an OAuth client (key is then empty).
	oauth *oauthTokens
	// Timeout bounds each call (DefaultAPITimeout unless changed before
	// first use); a token exchange counts as part of the call that needs it.
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

// NewTailscaleOAuth is NewTailscaleAPI authenticated with an OAuth client
// (client ID and secret; surrounding white space is ignored) instead of an
// API access token. Unlike an access token, which expires after at most
// 90 days, the client does not expire: each call uses a short-lived access
// token from the token endpoint (baseURL + /api/v2/oauth/token), fetched
// when the last one is about to expire. Deleting devices needs the
// client's devices:core scope.
func NewTailscaleOAuth(baseURL, tailnet, clientID, clientSecret string) *TailscaleAPI {
	a := NewTailscaleAPI(baseURL, tailnet, "")
	a.oauth = &oauthTokens{conf: clientcredentials.Config{
		ClientID:     strings.TrimSpace(clientID),
		ClientSecret: strings.TrimSpace(clientSecret),
		TokenURL:     a.base + "/api/v2/oauth/token",
		// Tailscale documents the credentials as form fields; naming the
		// style spares the library's probing, which would send a refused
		// request first.
		AuthStyle: oauth2.AuthStyleInParams,
	}}
	return a
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
	status, body, err := a.call(ctx, http.MethodDelete, "/api/v2/device/"+url.PathEscape(id))
	if err != nil {
		return fmt.Errorf("tailscale API: delete device %s: %w", id, err)
	}
	switch {
	case status >= 200 && status < 300:
		return nil
	case status == http.StatusNotFound:
		return nil // already gone
	}
	return &APIError{Op: "delete device " + id, Status: status, Message: apiMessage(body), OAuth: a.oauth != nil}
}

// errNoCredentials is a call made without an API key or OAuth client.
var errNoCredentials = errors.New("no credentials (neither tailscale.api_key_file nor tailscale.oauth_client_id is set)")

// call sends one request to path with the client's credentials, within
// Timeout, and returns the status and the body's start. An OAuth access
// token refused before its expiry (revoked, or a clock apart) is replaced
// once.
func (a *TailscaleAPI) call(ctx context.Context, method, path string) (int, []byte, error) {
	if a.oauth == nil && a.key == "" {
		return 0, nil, errNoCredentials
	}
	if a.Timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, a.Timeout)
		defer cancel()
	}
	status, body, err := a.once(ctx, method, path)
	if err == nil && status == http.StatusUnauthorized && a.oauth != nil {
		a.oauth.forget()
		status, body, err = a.once(ctx, method, path)
	}
	return status, body, err
}

// once sends one request with the current credentials.
func (a *TailscaleAPI) once(ctx context.Context, method, path string) (int, []byte, error) {
	bearer := a.key
	if a.oauth != nil {
		tok, err := a.oauth.token(ctx, a.client)
		if err != nil {
			return 0, nil, err
		}
		bearer = tok
	}
	req, err := http.NewRequestWithContext(ctx, method, a.base+path, nil)
	if err != nil {
		return 0, nil, err
	}
	// Tailscale accepts an API access token as a bearer token or as the
	// user of basic auth; OAuth access tokens only as bearer tokens.
	req.Header.Set("Authorization", "Bearer "+bearer)
	req.Header.Set("Accept", "application/json")
	resp, err := a.client.Do(req)
	if err != nil {
		return 0, nil, err
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, maxStatusBytes))
	return resp.StatusCode, body, nil
}

// APIError is a refusal or failure answered by Tailscale's API.
type APIError struct {
	Op      string // like "delete device nPEER1CNTRL"
	Status  int
	Message string // the API's "message", or the body's start
	// OAuth tells which credentials the hint names.
	OAuth bool
}

func (e *APIError) Error() string {
	hint := ""
	switch {
	case e.Status != http.StatusUnauthorized && e.Status != http.StatusForbidden:
	case e.OAuth:
		hint = " (check the OAuth client of tailscale.oauth_client_id: it needs the devices:core scope with write access, and must not be revoked)"
	default:
		hint = " (check the key in tailscale.api_key_file: API access tokens expire after at most 90 days, and the key's user must be allowed to remove devices; an OAuth client (tailscale.oauth_client_id) does not expire)"
	}
	return fmt.Sprintf("tailscale API: %s: %d %s: %s%s", e.Op, e.Status, http.StatusText(e.Status), e.Message, hint)
}

// TokenError is a failed exchange of the OAuth client's credentials for an
// access token. It never holds the client secret.
type TokenError struct {
	// Status is the token endpoint's HTTP status; 0 when it did not answer
	// (Err says why).
	Status  int
	Message string
	Err     error
}

func (e *TokenError) Error() string {
	if e.Status == 0 {
		return fmt.Sprintf("getting an OAuth access token: %v", e.Err)
	}
	return fmt.Sprintf("getting an OAuth access token: %d %s: %s (check tailscale.oauth_client_id and the secret in tailscale.oauth_client_secret_file: the client must exist, not be revoked, and have the devices:core scope)",
		e.Status, http.StatusText(e.Status), e.Message)
}

func (e *TokenError) Unwrap() error { return e.Err }

// oauthTokens keeps the current access token of an OAuth client. The
// exchange itself is golang.org/x/oauth2's; the token is kept here rather
// than in the library's caching source so that each exchange runs under
// the context (and Timeout) of the call that needs it.
type oauthTokens struct {
	conf clientcredentials.Config
	mu   sync.Mutex // one exchange at a time; callers wait for its token
	tok  *oauth2.Token
}

// token is a valid access token: the kept one, or a new one. Whether the
// kept one is still valid is oauth2.Token.Valid's judgement, on the wall
// clock (the library has no other): it expires a token 10 s before the
// expires_in the endpoint gave (about an hour), so a manual clock could
// not hurry it anyway.
func (o *oauthTokens) token(ctx context.Context, client *http.Client) (string, error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.tok.Valid() {
		return o.tok.AccessToken, nil
	}
	tok, err := o.conf.Token(context.WithValue(ctx, oauth2.HTTPClient, client))
	if err != nil {
		return "", tokenError(err)
	}
	o.tok = tok
	return tok.AccessToken, nil
}

// forget drops the kept token, so that the next call fetches a new one.
func (o *oauthTokens) forget() {
	o.mu.Lock()
	o.tok = nil
	o.mu.Unlock()
}

// tokenError turns the library's error into a TokenError that names the
// endpoint's status and message, not the library's multi-line dump.
func tokenError(err error) *TokenError {
	var re *oauth2.RetrieveError
	if !errors.As(err, &re) {
		return &TokenError{Err: err}
	}
	te := &TokenError{Err: err, Message: apiMessage(re.Body)}
	if re.Response != nil {
		te.Status = re.Response.StatusCode
	}
	if re.ErrorCode != "" {
		te.Message = strings.TrimSpace(re.ErrorCode + " " + re.ErrorDescription)
	}
	return te
}

// CheckKey proves the credentials work without changing anything: it
// lists the tailnet's devices (GET /api/v2/tailnet/{tailnet}/devices),
// which credentials that may delete devices may also do (for an OAuth
// client this also exchanges its secret for a token). It returns how many
// devices there are.
func (a *TailscaleAPI) CheckKey(ctx context.Context) (int, error) {
	status, body, err := a.call(ctx, http.MethodGet, "/api/v2/tailnet/"+url.PathEscape(a.tailnet)+"/devices")
	if err != nil {
		return 0, fmt.Errorf("tailscale API: list devices: %w", err)
	}
	if status != http.StatusOK {
		return 0, &APIError{Op: "list devices of tailnet " + a.tailnet, Status: status, Message: apiMessage(body), OAuth: a.oauth != nil}
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
