# The NixOS module as the flake offers it: ./default.nix with the flake's packages as defaults.
# A server deployed from a configuration built with it has everything the agent needs after the
# first release replaces the image's system: the agent, fh, the Nix the agent and fh run,
# determinate-nixd where Determinate Nix is the choice, and git (./default.nix installs fh and
# git with the agent).
#
# flake.nix instantiates it twice:
# - `nixosModules.default`: with Determinate Nix (DeterminateSystems/determinate's NixOS module,
#   which sets `nix.package` to Determinate Nix and runs determinate-nixd); the image's choice.
# - `nixosModules.upstreamNix`: without it; the agent then logs in through fh's token file.
# tests/nixos/eval.nix instantiates it with stand-in inputs.
{
  # The flake itself (`packages.<system>.default`: hcloud-nixos).
  hcloudNixos,
  # DeterminateSystems/fh (`packages.<system>.default`).
  fh,
  # DeterminateSystems/determinate (`nixosModules.default`, `packages.<system>.default`:
  # determinate-nixd).
  determinate,
  # Whether to import Determinate's NixOS module.
  withDeterminate,
}:

{
  config,
  lib,
  pkgs,
  ...
}:

let
  system = pkgs.stdenv.hostPlatform.system;
in
{
  imports = [ ./default.nix ] ++ lib.optional withDeterminate determinate.nixosModules.default;

  services.hcloud-nixos = {
    package = lib.mkDefault hcloudNixos.packages.${system}.server;
    fhPackage = lib.mkDefault fh.packages.${system}.default;
    # Determinate's module exposes no option for determinate-nixd's package (it installs
    # `inputs.self.packages.<system>.default`); the same package comes from the flake input.
    # Whenever Determinate Nix is on, also when a user imported its module next to upstreamNix.
    determinateNixdPackage = lib.mkDefault (
      if config.determinate.enable or false then determinate.packages.${system}.default else null
    );
  };
}
