package apiserver

import (
	"encoding/base64"
	"fmt"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"guardianproject.dev/ops/nix-builder-autoscaler/internal/api"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/store"
)

// Every list endpoint answers in pages (api.DefaultPageSize items unless
// limit says otherwise, at most api.MaxPageSize), so that no answer, and
// no buffer behind it, grows with the store: 13,500 reservations once made
// one answer of 8.6 MB, and a hundred such lists at once took 2 GB.
//
// A cursor is opaque to clients. Inside, it is a list's kind and the
// position of the page's last item in the list's stable order, so items
// created meanwhile do not shift later pages: reservations and forecasts
// go by creation time, then id (newest first), events by sequence number
// (newest pages first).
const (
	cursorReservations = "r"
	cursorForecasts    = "f"
	cursorEvents       = "e"
)

// pageLimit reads the "limit" query parameter: api.DefaultPageSize when
// absent or 0. It answers 400 and returns false when it is not an integer
// in 0..api.MaxPageSize.
func pageLimit(w http.ResponseWriter, q url.Values) (int, bool) {
	l := q.Get("limit")
	if l == "" {
		return api.DefaultPageSize, true
	}
	n, err := strconv.Atoi(l)
	if err != nil || n < 0 || n > api.MaxPageSize {
		writeError(w, http.StatusBadRequest, api.CodeBadRequest,
			fmt.Sprintf("limit: must be an integer from 1 to %d (0 or none: %d); follow next for more", api.MaxPageSize, api.DefaultPageSize))
		return 0, false
	}
	if n == 0 {
		n = api.DefaultPageSize
	}
	return n, true
}

func encodeCursor(kind, pos string) string {
	return base64.RawURLEncoding.EncodeToString([]byte(kind + ":" + pos))
}

// decodeCursor returns the position in the "cursor" query parameter ("" if
// none), or answers 400 and returns false when it is not a cursor of kind.
func decodeCursor(w http.ResponseWriter, q url.Values, kind string) (string, bool) {
	c := q.Get("cursor")
	if c == "" {
		return "", true
	}
	b, err := base64.RawURLEncoding.DecodeString(c)
	pos, ok := strings.CutPrefix(string(b), kind+":")
	if err != nil || !ok || pos == "" {
		writeError(w, http.StatusBadRequest, api.CodeBadRequest, "cursor: not a cursor of this list; pass the next of the previous answer unchanged")
		return "", false
	}
	return pos, true
}

func keyCursor(kind string, k store.ListKey) string {
	return encodeCursor(kind, strconv.FormatInt(k.CreatedAt.UnixNano(), 10)+":"+k.ID)
}

// keyFromCursor reads a cursor of a list by creation time and id.
func keyFromCursor(w http.ResponseWriter, q url.Values, kind string) (store.ListKey, bool) {
	pos, ok := decodeCursor(w, q, kind)
	if !ok || pos == "" {
		return store.ListKey{}, ok
	}
	at, id, found := strings.Cut(pos, ":")
	n, err := strconv.ParseInt(at, 10, 64)
	if !found || err != nil || id == "" {
		writeError(w, http.StatusBadRequest, api.CodeBadRequest, "cursor: not a cursor of this list; pass the next of the previous answer unchanged")
		return store.ListKey{}, false
	}
	return store.ListKey{CreatedAt: time.Unix(0, n).UTC(), ID: id}, true
}

// seqFromCursor reads a cursor of the event log.
func seqFromCursor(w http.ResponseWriter, q url.Values) (int64, bool) {
	pos, ok := decodeCursor(w, q, cursorEvents)
	if !ok || pos == "" {
		return 0, ok
	}
	n, err := strconv.ParseInt(pos, 10, 64)
	if err != nil || n <= 0 {
		writeError(w, http.StatusBadRequest, api.CodeBadRequest, "cursor: not a cursor of this list; pass the next of the previous answer unchanged")
		return 0, false
	}
	return n, true
}
