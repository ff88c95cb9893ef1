# SSH keys for the NixOS VM test only (generated for it; they protect
# nothing). client: the Buildbot host's Nix logs in to the builder with it;
# host: the builder's host key, the "shared host key" of the pool.
{
  clientPrivate = ''
    -----BEGIN OPENSSH PRIVATE KEY-----
    b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW
    QyNTUxOQAAACATDCvPrXbOSS8BYcf0lPGJiHQKgKvv5TDStZ/VtgoBWAAAAJiG9j/hhvY/
    4QAAAAtzc2gtZWQyNTUxOQAAACATDCvPrXbOSS8BYcf0lPGJiHQKgKvv5TDStZ/VtgoBWA
    AAAEA1AuX5Lqp01ZTprOqAPBI1ppzrLnk54Uc/VlCEuP9ypxMMK8+tds5JLwFhx/SU8YmI
    dAqAq+/lMNK1n9W2CgFYAAAAEm5iYS12bS10ZXN0LWNsaWVudAECAw==
    -----END OPENSSH PRIVATE KEY-----
  '';
  clientPublic = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBMMK8+tds5JLwFhx/SU8YmIdAqAq+/lMNK1n9W2CgFY nba-vm-test-client";
  hostPrivate = ''
    -----BEGIN OPENSSH PRIVATE KEY-----
    b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW
    QyNTUxOQAAACAshFkGqWVAmt9h+CcuAdWxgijXie3CmEHRQVA6/UTuKwAAAKDYNBEE2DQR
    BAAAAAtzc2gtZWQyNTUxOQAAACAshFkGqWVAmt9h+CcuAdWxgijXie3CmEHRQVA6/UTuKw
    AAAEA4vrs+IfK3pddafXjeeWeE5Z5Sbtv37gghmTWRcXQugiyEWQapZUCa32H4Jy4B1bGC
    KNeJ7cKYQdFBUDr9RO4rAAAAGG5iYS12bS10ZXN0LWJ1aWxkZXItaG9zdAECAwQF
    -----END OPENSSH PRIVATE KEY-----
  '';
  hostPublic = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAICyEWQapZUCa32H4Jy4B1bGCKNeJ7cKYQdFBUDr9RO4r nba-vm-test-builder-host";
}
