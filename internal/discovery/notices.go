package discovery

import (
	"context"

	"guardianproject.dev/ops/nix-builder-autoscaler/scaler"
)

var _ scaler.NoticeReader = (*Provider)(nil)

// Notices passes the inner provider's interruption notices through, so
// that discovery does not hide them from the reconciler; an inner
// provider that gives none gives none here.
func (p *Provider) Notices(ctx context.Context, instances []scaler.Instance) (map[string]scaler.Notice, error) {
	if nr, ok := p.inner.(scaler.NoticeReader); ok {
		return nr.Notices(ctx, instances)
	}
	return nil, nil
}
