# The raw disk image of a NixOS system built with ./default.nix: GPT with a BIOS boot partition,
# an EFI system partition and an ext4 root labelled `nixos` (x86_64), or EFI only (aarch64).
{ nixpkgs, lib, pkgs, config }:

import "${nixpkgs}/nixos/lib/make-disk-image.nix" {
  inherit lib pkgs config;
  name = "hcloud-nixos-${pkgs.stdenv.hostPlatform.system}";
  format = "raw";
  partitionTableType = if pkgs.stdenv.hostPlatform.isx86_64 then "hybrid" else "efi";
  label = "nixos";
  # Just big enough for the closure; the root grows to the server's disk at first boot.
  diskSize = "auto";
  additionalSpace = "512M";
  bootSize = "256M";
  copyChannel = false;
}
