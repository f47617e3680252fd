# NixOS configuration of the Hetzner Cloud disk images: a small, keys-only server that boots on
# every Hetzner server type (x86_64: legacy BIOS and UEFI from one image; aarch64: UEFI), grows
# its root file system to the disk at first boot, and runs hcloud-nixos. Import it together with
# the flake's `nixosModules.default` (the module in ../nixos-module with fh, git and Determinate
# Nix): the image is built from those two and nothing else, so that everything the agent needs
# comes from nixosModules.default, which a user's own configuration imports too. Nothing the agent
# needs may be added here only: the first release a server deploys replaces this system.
{ config, lib, pkgs, modulesPath, ... }:

let
  x86 = pkgs.stdenv.hostPlatform.isx86_64;
in
{
  imports = [ (modulesPath + "/profiles/qemu-guest.nix") ];

  # Boot: GRUB in the MBR gap for BIOS (x86 servers) and as the removable EFI loader for UEFI
  # (arm servers and some newer x86 types); the disk image has both partitions.
  boot.loader.grub = {
    enable = true;
    device = if x86 then "/dev/sda" else "nodev";
    efiSupport = true;
    efiInstallAsRemovable = true;
  };
  boot.loader.efi.canTouchEfiVariables = false;
  boot.loader.timeout = 1;

  fileSystems."/" = {
    device = "/dev/disk/by-label/nixos";
    fsType = "ext4";
    autoResize = true;
  };
  fileSystems."/boot" = {
    device = "/dev/disk/by-label/ESP";
    fsType = "vfat";
    options = [ "umask=0077" ];
  };
  boot.growPartition = true;

  # Hetzner's virtual hardware, and a console on the screen and the serial port.
  boot.initrd.availableKernelModules = [ "virtio_pci" "virtio_scsi" "virtio_blk" "virtio_net" "sd_mod" "sr_mod" ]
    ++ lib.optionals (!x86) [ "virtio_gpu" ];
  boot.kernelParams = [ "console=tty0" ] ++ (if x86 then [ "console=ttyS0,115200" ] else [ "console=ttyAMA0,115200" ]);

  # Networking: DHCPv4 from networkd's catch-all, static IPv6 from hcloud-nixos (its files sort
  # first), the hostname from the metadata (no static one here).
  networking.hostName = "";
  networking.useNetworkd = true;
  networking.useDHCP = true;
  networking.timeServers = [ "ntp1.hetzner.de" "ntp2.hetzner.com" "ntp3.hetzner.net" ];

  # The QEMU guest agent is what Hetzner's password reset uses.
  services.qemuGuest.enable = true;

  services.openssh = {
    enable = true;
    settings = {
      PasswordAuthentication = false;
      KbdInteractiveAuthentication = false;
      PermitRootLogin = "prohibit-password";
    };
  };

  services.hcloud-nixos.enable = true;

  # Small: no documentation, no fonts, no X, no spare kernels' worth of space.
  documentation.enable = false;
  documentation.nixos.enable = false;
  documentation.man.enable = false;
  documentation.info.enable = false;
  documentation.doc.enable = false;
  fonts.fontconfig.enable = false;
  xdg.mime.enable = false;
  environment.defaultPackages = [ ];
  programs.command-not-found.enable = false;
  boot.loader.grub.configurationLimit = 5;

  nix.settings.experimental-features = [ "nix-command" "flakes" ];

  system.stateVersion = lib.mkDefault "25.11";
}
