# The smallest configuration: one local pool, every other key at its default.
{
  services.nix-builder-autoscaler = {
    enable = true;
    settings.pool = [
      {
        name = "x86";
        systems = [ "x86_64-linux" ];
        max_builders = 2;
        provider = "local";
      }
    ];
  };
}
