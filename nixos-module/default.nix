# The NixOS module of hcloud-nixos: boot-time provisioning from the Hetzner metadata service and
# the deploy agent. Behaviour lives in the Rust binary and in the unit files next to this one
# (units/), which are installed as they are, with store paths filled in; this file only wires
# them up and renders the agent's TOML.
{ config, lib, pkgs, ... }:

let
  cfg = config.services.hcloud-nixos;
  inherit (lib) mkEnableOption mkIf mkOption types literalExpression;

  settingsFormat = pkgs.formats.toml { };

  # The typed options, in the agent's own key names; unset ones are left out so that the
  # agent's defaults (and user-data) apply. `settings` is merged over this and wins.
  typedSettings = lib.filterAttrsRecursive (_: v: v != null && v != { } && v != [ ]) {
    flake = cfg.flake;
    operation = cfg.operation;
    poll_interval = cfg.pollInterval;
    flakehub.token_file = cfg.tokenFile;
    confirm_timeout = cfg.confirmTimeout;
    min_release_age = cfg.minReleaseAge;
    reboot = cfg.reboot.policy;
    reboot_window = lib.optionalAttrs (cfg.reboot.policy == "window") {
      inherit (cfg.reboot.window) days start length;
      time_zone = cfg.reboot.window.timeZone;
    };
    health_check = map (check: lib.filterAttrs (_: v: v != null) check) cfg.healthChecks;
    metrics = {
      listen = cfg.metrics.listen;
      textfile = cfg.metrics.textfile;
    };
  };

  configFile = settingsFormat.generate "hcloud-nixos-agent.toml"
    (lib.recursiveUpdate typedSettings cfg.settings);

  # The unit files of this directory with the store paths filled in: the very files the tests
  # run under systemd on a development machine.
  units = pkgs.runCommand "hcloud-nixos-units" { } ''
    mkdir -p $out/lib/systemd/system $out/share/hcloud-nixos
    cp ${./metadata-firewall.nft} $out/share/hcloud-nixos/metadata-firewall.nft
    for unit in ${./units}/*.service; do
      substitute "$unit" "$out/lib/systemd/system/$(basename "$unit")" \
        --subst-var-by hcloudNixos ${cfg.package} \
        --subst-var-by kill ${pkgs.coreutils}/bin/kill \
        --subst-var-by path /run/current-system/sw/bin:/run/wrappers/bin \
        --subst-var-by nft ${pkgs.nftables}/bin/nft \
        --subst-var-by rules $out/share/hcloud-nixos/metadata-firewall.nft
    done
  '';

  healthCheck = types.submodule {
    options = {
      command = mkOption {
        type = types.nullOr (types.listOf types.str);
        default = null;
        example = [ "/run/current-system/sw/bin/curl" "-fsS" "http://127.0.0.1:8080/healthz" ];
        description = "A command (argv, no shell) that must exit 0.";
      };
      url = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "http://127.0.0.1:8080/healthz";
        description = "A URL that must answer with a 2xx status.";
      };
      timeout = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "10s";
        description = "How long one run of this check may take.";
      };
    };
  };
in
{
  options.services.hcloud-nixos = {
    enable = mkEnableOption "hcloud-nixos: network, hostname and SSH keys from the Hetzner metadata service, and the deploy agent";

    package = mkOption {
      type = types.package;
      description = "The hcloud-nixos package (the flake's `nixosModules.default` sets it).";
    };

    network.enable = mkOption {
      type = types.bool;
      default = true;
      description = ''
        Configure static IPv6 (systemd-networkd files), the hostname and root's SSH keys from the
        metadata service at every boot (`hcloud-nixos network`).
      '';
    };

    agent.enable = mkOption {
      type = types.bool;
      default = true;
      description = "Run the deploy agent, which follows a FlakeHub output reference.";
    };

    restrictMetadataService = mkOption {
      type = types.bool;
      default = true;
      description = ''
        Let only root reach the metadata service (169.254.169.254). It serves the user-data, and
        with it the FlakeHub token, to any process that asks. The rule is an nftables table of its
        own, so it works with both the iptables and the nftables firewall.
      '';
    };

    flake = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "my-org/infra/0.1#nixosConfigurations.web";
      description = ''
        FlakeHub output reference to follow. Usually left unset here and given in the server's
        user-data; when set, it wins over user-data. Without `#attr`,
        `nixosConfigurations.<hostname>` is used.
      '';
    };

    tokenFile = mkOption {
      type = types.nullOr types.path;
      default = null;
      example = "/run/secrets/flakehub";
      description = "File holding the FlakeHub token; wins over the token in user-data.";
    };

    pollInterval = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "60s";
      description = "How often to ask FlakeHub for a new release (the agent's default: 60s).";
    };

    operation = mkOption {
      type = types.nullOr (types.enum [ "switch" "boot" "test" ]);
      default = null;
      example = "switch";
      description = "What `fh apply nixos` does with a new release (the agent's default: switch).";
    };

    confirmTimeout = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "120s";
      description = "How long a new release has to prove healthy before it is rolled back.";
    };

    minReleaseAge = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "2h";
      description = "Apply a release only once it has been published this long (0 on canaries).";
    };

    healthChecks = mkOption {
      type = types.listOf healthCheck;
      default = [ ];
      example = literalExpression ''[ { url = "http://127.0.0.1:8080/healthz"; timeout = "10s"; } ]'';
      description = "Checks that must pass after a deploy; any failure rolls it back.";
    };

    reboot = {
      policy = mkOption {
        type = types.nullOr (types.enum [ "never" "when-needed" "window" ]);
        default = null;
        example = "window";
        description = "When to reboot into a new kernel: never, right after the deploy, or inside a window.";
      };
      window = {
        days = mkOption {
          type = types.listOf (types.enum [ "Mon" "Tue" "Wed" "Thu" "Fri" "Sat" "Sun" ]);
          default = [ "Sat" "Sun" ];
          description = "Days on which the maintenance window opens.";
        };
        start = mkOption {
          type = types.str;
          default = "02:00";
          description = "Local time at which the window opens.";
        };
        length = mkOption {
          type = types.str;
          default = "2h";
          description = "How long the window stays open.";
        };
        timeZone = mkOption {
          type = types.str;
          default = "UTC";
          example = "Europe/Berlin";
          description = "Time zone of `start`.";
        };
      };
    };

    metrics = {
      listen = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "127.0.0.1:9945";
        description = "Address for Prometheus metrics over HTTP; off when null.";
      };
      textfile = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "/var/lib/prometheus-node-exporter-text/hcloud-nixos.prom";
        description = "File for node-exporter's textfile collector; off when null.";
      };
    };

    settings = mkOption {
      type = settingsFormat.type;
      default = { };
      example = literalExpression ''{ retry_limit = 5; apply.timeout = "30m"; }'';
      description = ''
        The agent's configuration (`/etc/hcloud-nixos/agent.toml`), in its own key names; merged
        over the typed options above and winning over them. See the README for every key.
      '';
    };
  };

  config = mkIf cfg.enable {
    assertions = [
      {
        assertion = !cfg.network.enable || config.networking.useNetworkd || config.systemd.network.enable;
        message = "services.hcloud-nixos.network needs systemd-networkd (networking.useNetworkd = true).";
      }
    ];

    environment.systemPackages = [ cfg.package ];
    systemd.packages = [ units ];

    systemd.services.hcloud-nixos-network = mkIf cfg.network.enable {
      wantedBy = [ "multi-user.target" ];
    };

    systemd.services.hcloud-nixos-agent = mkIf cfg.agent.enable {
      wantedBy = [ "multi-user.target" ];
      # A changed configuration is re-read (SIGHUP), never a restart in the middle of an apply.
      reloadTriggers = [ configFile ];
    };

    systemd.services.hcloud-nixos-metadata-firewall = mkIf cfg.restrictMetadataService {
      wantedBy = [ "sysinit.target" ];
    };

    environment.etc."hcloud-nixos/agent.toml".source = configFile;

    # The metadata's keys, in a file of their own: keys a user put in ~/.ssh/authorized_keys stay.
    services.openssh.authorizedKeysFiles = mkIf cfg.network.enable [ "/run/hcloud-nixos/authorized_keys/%u" ];
  };
}
