{
  description = "NixOS on Hetzner Cloud: disk images, boot-time provisioning and a pull-based deploy agent";

  inputs = {
    # A supported release. Its rustc must be at least Cargo.toml's rust-version: checked below
    # when the package is evaluated (25.11 ships rustc 1.91.1, pkgs/development/compilers/rust/
    # 1_91.nix).
    nixpkgs.url = "https://flakehub.com/f/NixOS/nixpkgs/0.2511.*";
    determinate.url = "https://flakehub.com/f/DeterminateSystems/determinate/*";
    fh.url = "https://flakehub.com/f/DeterminateSystems/fh/*";
  };

  outputs =
    {
      self,
      nixpkgs,
      determinate,
      fh,
      ...
    }:
    let
      inherit (nixpkgs) lib;
      systems = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      forAllSystems = f: lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});

      cargoToml = lib.importTOML ./Cargo.toml;
      rustVersion = cargoToml.package.rust-version;

      # The pinned nixpkgs' rustc against Cargo.toml's rust-version: a clear message at
      # evaluation instead of cargo's refusal deep in a build.
      requireRust =
        pkgs:
        lib.throwIfNot (lib.versionAtLeast pkgs.rustc.version rustVersion)
          "hcloud-nixos: Cargo.toml says rust-version = \"${rustVersion}\", but the pinned nixpkgs (${lib.version}) ships rustc ${pkgs.rustc.version}. Update the nixpkgs input (nix flake update nixpkgs) or pin a newer release."
          pkgs;

      # The binary, built from Cargo.lock. Its tests need root, namespaces and a systemd; they
      # run in CI (.ci/run) and in the VM test below, not in the sandbox. `workstation`: with
      # upload and cleanup (an SSH client, compressors, progress bars); servers run the build
      # without them.
      packageWith =
        { workstation }:
        pkgs':
        let
          pkgs = requireRust pkgs';
        in
        pkgs.rustPlatform.buildRustPackage {
          pname = cargoToml.package.name + lib.optionalString (!workstation) "-server";
          buildNoDefaultFeatures = !workstation;
          version = cargoToml.package.version;
          # Everything cargo reads: the manifest's example targets live in tests/, and the unit
          # tests read tests/fixtures/. The Nix files under tests/nixos are not part of it.
          src = lib.fileset.toSource {
            root = ./.;
            fileset = lib.fileset.unions [
              ./Cargo.toml
              ./Cargo.lock
              ./src
              (lib.fileset.difference ./tests ./tests/nixos)
            ];
          };
          cargoLock.lockFile = ./Cargo.lock;
          # etcd-client's build script runs protoc (prost-build: `PROTOC`, else `protoc` in PATH)
          # on .proto files that import google/protobuf/descriptor.proto (prost-build adds
          # `PROTOC_INCLUDE` to the include path). nixpkgs' protobuf has both in its one output.
          nativeBuildInputs = [ pkgs.protobuf ];
          env = {
            PROTOC = lib.getExe' pkgs.buildPackages.protobuf "protoc";
            PROTOC_INCLUDE = "${pkgs.buildPackages.protobuf}/include";
          }
          # The servers' build is optimized for size, and its relative relocations are packed
          # (DT_RELR: glibc 2.36 and binutils 2.38 or later): the programs touch fewer pages at
          # start and at every poll (see README, "Benchmarks"); the workstation's uploader keeps
          # opt-level 3 for its data path. Same as tests/bench/{agent,network}.sh.
          // lib.optionalAttrs (!workstation) {
            CARGO_PROFILE_RELEASE_OPT_LEVEL = "z";
            RUSTFLAGS = "-C link-arg=-Wl,-z,pack-relative-relocs";
          };
          doCheck = false;
          meta = {
            description = cargoToml.package.description;
            mainProgram = "hcloud-nixos";
            platforms = systems;
          };
        };

      package = packageWith { workstation = true; };
      serverPackage = packageWith { workstation = false; };

      # The NixOS modules (see nixos-module/flake-module.nix).
      flakeModule =
        withDeterminate:
        import ./nixos-module/flake-module.nix {
          hcloudNixos = self;
          inherit fh determinate withDeterminate;
        };

      # The NixOS system inside the disk image: the flake's modules and nothing else, so that a
      # user's configuration built from nixosModules.default has everything the image had.
      imageSystem =
        system:
        lib.nixosSystem {
          inherit system;
          modules = [
            self.nixosModules.default
            self.nixosModules.image
          ];
        };

      diskImage =
        pkgs:
        import ./image/disk.nix {
          inherit nixpkgs lib pkgs;
          inherit (imageSystem pkgs.stdenv.hostPlatform.system) config;
        };

      hetznerArch = pkgs: if pkgs.stdenv.hostPlatform.isx86_64 then "x86" else "arm";

      # A minimal NixOS system with the module, for the evaluation checks.
      minimalSystem =
        system: modules:
        lib.nixosSystem {
          inherit system;
          modules = modules ++ [
            {
              boot.loader.grub.enable = false;
              fileSystems."/" = {
                device = "/dev/disk/by-label/nixos";
                fsType = "ext4";
              };
              networking.useNetworkd = true;
              services.hcloud-nixos.enable = true;
              system.stateVersion = "25.11";
            }
          ];
        };

      # Evaluates a system completely (every option, every assertion, every derivation
      # instantiated) without building it: the check's output is the toplevel's .drv path.
      evaluated =
        pkgs: name: sys:
        pkgs.writeText "hcloud-nixos-eval-${name}" (
          builtins.unsafeDiscardStringContext sys.config.system.build.toplevel.drvPath
        );
    in
    {
      packages = forAllSystems (pkgs: {
        default = package pkgs;
        hcloud-nixos = package pkgs;
        # What servers run (the NixOS module's default): no workstation commands.
        server = serverPackage pkgs;
      });

      nixosModules = {
        # The agent, fh, git and Determinate Nix (determinate-nixd logs the machine in): what the
        # image runs.
        default = flakeModule true;
        # The same with upstream Nix: no determinate-nixd; the agent writes the token to fh's
        # own token file.
        upstreamNix = flakeModule false;
        image = import ./image;
      };

      diskImages = forAllSystems (pkgs: {
        hetzner = diskImage pkgs;
      });

      # `nix run .#upload`: builds this system's image and turns it into a Hetzner snapshot
      # (HCLOUD_TOKEN, or the hcloud CLI's active context). Extra arguments go to the uploader.
      apps = forAllSystems (pkgs: {
        upload = {
          type = "app";
          program = toString (
            pkgs.writeShellScript "hcloud-nixos-upload" ''
              exec ${package pkgs}/bin/hcloud-nixos upload \
                --image ${diskImage pkgs}/nixos.img \
                --architecture ${hetznerArch pkgs} \
                --description "NixOS (hcloud-nixos ${cargoToml.package.version})" \
                "$@"
            ''
          );
        };
        # `nix run .#create -- NAME --flake ORG/FLAKE/VERSION`: a server from the newest snapshot
        # `upload` made, followed until its release is deployed (HCLOUD_TOKEN and FLAKEHUB_TOKEN,
        # or --token-file and --flakehub-token-file). It uses the user's own OpenSSH client.
        create = {
          type = "app";
          program = toString (
            pkgs.writeShellScript "hcloud-nixos-create" ''
              exec ${package pkgs}/bin/hcloud-nixos create "$@"
            ''
          );
        };
      });

      checks = forAllSystems (
        pkgs:
        let
          system = pkgs.stdenv.hostPlatform.system;
          withNftables = minimalSystem system [
            self.nixosModules.default
            {
              # A hand-written ruleset: nftables.service flushes the whole ruleset on every start
              # and reload; the metadata table must be part of what it loads.
              networking.nftables.enable = true;
              networking.nftables.ruleset = ''
                table inet hand_written {
                  chain input {
                    type filter hook input priority 0; policy accept;
                  }
                }
              '';
            }
          ];
        in
        {
          # The builds (and with them the rust-version check above).
          package = package pkgs;
          server = serverPackage pkgs;
          # A server against stand-ins for the metadata service and FlakeHub (needs KVM).
          vm = import ./tests/nixos/vm-test.nix {
            inherit pkgs;
            module = self.nixosModules.upstreamNix;
          };
          # The module in minimal NixOS systems: evaluation and assertions, nothing built.
          eval-default = evaluated pkgs "default" (minimalSystem system [ self.nixosModules.default ]);
          eval-upstream-nix = evaluated pkgs "upstream-nix" (
            minimalSystem system [ self.nixosModules.upstreamNix ]
          );
          eval-nftables = evaluated pkgs "nftables" withNftables;
          eval-image = evaluated pkgs "image" (imageSystem system);
          # nftables.service's rules script with the metadata table in it: nixpkgs checks it with
          # `nft --check` when it is built (networking.nftables.checkRuleset). Its name, written to
          # a file, depends on it, whatever form ExecStart has (a derivation, a list, a string).
          nftables-ruleset = pkgs.writeText "hcloud-nixos-nftables-ruleset" (
            toString (lib.last (lib.toList withNftables.config.systemd.services.nftables.serviceConfig.ExecStart))
          );
        }
      );

      devShells = forAllSystems (pkgs: {
        default = pkgs.mkShell {
          packages = with pkgs; [
            cargo
            rustc
            clippy
            rustfmt
            rust-analyzer
            protobuf
            iproute2
            nftables
            openssh
            zstd
            qemu-utils
            nixfmt
          ];
          PROTOC_INCLUDE = "${pkgs.protobuf}/include";
        };
      });

      # nixfmt is the RFC 166 style formatter (formerly nixfmt-rfc-style).
      formatter = forAllSystems (pkgs: pkgs.nixfmt);
    };
}
