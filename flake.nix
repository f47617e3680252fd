{
  description = "NixOS on Hetzner Cloud: disk images, boot-time provisioning and a pull-based deploy agent";

  inputs = {
    nixpkgs.url = "https://flakehub.com/f/NixOS/nixpkgs/0.2505.*";
    determinate.url = "https://flakehub.com/f/DeterminateSystems/determinate/*";
    fh.url = "https://flakehub.com/f/DeterminateSystems/fh/*";
  };

  outputs = { self, nixpkgs, determinate, fh, ... }:
    let
      inherit (nixpkgs) lib;
      systems = [ "x86_64-linux" "aarch64-linux" ];
      forAllSystems = f: lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});

      cargoToml = lib.importTOML ./Cargo.toml;

      # The binary, built from Cargo.lock. Its tests need root, namespaces and a systemd; they
      # run in CI (.ci/run) and in the VM test below, not in the sandbox.
      package = pkgs: pkgs.rustPlatform.buildRustPackage {
        pname = cargoToml.package.name;
        version = cargoToml.package.version;
        src = lib.fileset.toSource {
          root = ./.;
          fileset = lib.fileset.unions [ ./Cargo.toml ./Cargo.lock ./src ./tests ];
        };
        cargoLock.lockFile = ./Cargo.lock;
        doCheck = false;
        meta = {
          description = cargoToml.package.description;
          mainProgram = "hcloud-nixos";
          platforms = systems;
        };
      };

      # The NixOS system inside the disk image.
      imageSystem = system: lib.nixosSystem {
        inherit system;
        modules = [
          determinate.nixosModules.default
          self.nixosModules.default
          self.nixosModules.image
          { environment.systemPackages = [ fh.packages.${system}.default ]; }
        ];
      };

      diskImage = pkgs: import ./image/disk.nix {
        inherit nixpkgs lib pkgs;
        inherit (imageSystem pkgs.stdenv.hostPlatform.system) config;
      };

      hetznerArch = pkgs: if pkgs.stdenv.hostPlatform.isx86_64 then "x86" else "arm";
    in
    {
      packages = forAllSystems (pkgs: {
        default = package pkgs;
        hcloud-nixos = package pkgs;
      });

      nixosModules = {
        default = { pkgs, lib, ... }: {
          imports = [ ./nixos-module ];
          services.hcloud-nixos.package = lib.mkDefault self.packages.${pkgs.stdenv.hostPlatform.system}.default;
        };
        image = import ./image;
      };

      diskImages = forAllSystems (pkgs: { hetzner = diskImage pkgs; });

      # `nix run .#upload`: builds this system's image and turns it into a Hetzner snapshot
      # (HCLOUD_TOKEN, or the hcloud CLI's active context). Extra arguments go to the uploader.
      apps = forAllSystems (pkgs: {
        upload = {
          type = "app";
          program = toString (pkgs.writeShellScript "hcloud-nixos-upload" ''
            exec ${package pkgs}/bin/hcloud-nixos upload \
              --image ${diskImage pkgs}/nixos.img \
              --architecture ${hetznerArch pkgs} \
              --description "NixOS (hcloud-nixos ${cargoToml.package.version})" \
              "$@"
          '');
        };
      });

      checks = forAllSystems (pkgs: {
        vm = import ./tests/nixos/vm-test.nix {
          inherit pkgs;
          module = self.nixosModules.default;
        };
      });

      devShells = forAllSystems (pkgs: {
        default = pkgs.mkShell {
          packages = with pkgs; [ cargo rustc clippy rustfmt rust-analyzer iproute2 nftables openssh zstd qemu-utils nixfmt-rfc-style ];
        };
      });

      formatter = forAllSystems (pkgs: pkgs.nixfmt-rfc-style);
    };
}
