# The NixOS module of hcloud-nixos: boot-time provisioning from the Hetzner metadata service and
# the deploy agent. Behaviour lives in the Rust binary and in the unit files next to this one
# (units/), which are installed as they are, with store paths filled in; this file wires them up
# and renders the agent's TOML. The flake's `nixosModules.default` and `nixosModules.upstreamNix`
# (./flake-module.nix) import this file and fill in the packages. What NixOS does with the units
# and why the programs are rendered as store paths: docs/nixos.md.
{
  config,
  lib,
  pkgs,
  ...
}:

let
  cfg = config.services.hcloud-nixos;
  inherit (lib)
    mkEnableOption
    mkIf
    mkOption
    types
    literalExpression
    ;

  settingsFormat = pkgs.formats.toml { };

  # Days as the agent spells them (it also takes full names, in any case).
  dayNames = [
    "Mon"
    "Tue"
    "Wed"
    "Thu"
    "Fri"
    "Sat"
    "Sun"
  ];

  # The programs the agent runs, as absolute store paths. NixOS gives every service it configures
  # through `systemd.services.<name>` a drop-in `overrides.conf` whose `Environment=PATH=` is
  # NixOS's default service path (coreutils, findutils, gnugrep, gnused, systemd) plus the
  # service's `path` (nixos/lib/systemd-lib.nix: `stage2ServiceConfig`, `serviceConfig`,
  # `serviceToUnit`; `generateUnits` turns it into `<unit>.d/overrides.conf` because the unit
  # itself comes from `systemd.packages`). That PATH replaces the unit file's own, so nothing the
  # agent runs may depend on finding it there: the TOML names each program by its store path, and
  # the unit's `path` carries the same packages for the programs those run (fh runs `nix`).
  nixPackage = config.nix.package;
  agentPrograms = {
    fh = lib.getExe' cfg.fhPackage "fh";
    nix = lib.getExe' nixPackage "nix";
    nix_env = lib.getExe' nixPackage "nix-env";
  }
  // lib.optionalAttrs (cfg.determinateNixdPackage != null) {
    # With upstream Nix this stays unset: the agent finds no determinate-nixd (it is not in the
    # unit's PATH either) and logs in through fh's own token file.
    determinate_nixd = lib.getExe' cfg.determinateNixdPackage "determinate-nixd";
  };
  agentPackages = [
    cfg.fhPackage
    nixPackage
  ]
  ++ lib.optional (cfg.determinateNixdPackage != null) cfg.determinateNixdPackage;

  # A path literal would be copied into the world-readable store as soon as it is rendered:
  # render its name only (the assertion below fails the build anyway).
  pathAsString = v: if builtins.isPath v then toString v else v;

  # The typed options, in the agent's own key names; unset ones are left out so that the agent's
  # defaults (and user-data) apply. `settings` is merged over this and wins.
  typedSettings = lib.filterAttrsRecursive (_: v: v != null && v != { } && v != [ ]) {
    flake = cfg.flake;
    operation = cfg.operation;
    poll_interval = cfg.pollInterval;
    flakehub.token_file = if cfg.tokenFile == null then null else pathAsString cfg.tokenFile;
    confirm_timeout = cfg.confirmTimeout;
    min_release_age = cfg.minReleaseAge;
    reboot = cfg.reboot.policy;
    # Every window key that is set, whatever the policy: the policy may come from user-data.
    reboot_window = {
      days = if cfg.reboot.window.days == [ ] then null else cfg.reboot.window.days;
      start = cfg.reboot.window.start;
      length = cfg.reboot.window.length;
      time_zone = cfg.reboot.window.timeZone;
    };
    health_check = map (check: lib.filterAttrs (_: v: v != null) check) cfg.healthChecks;
    metrics = {
      listen = cfg.metrics.listen;
      textfile = cfg.metrics.textfile;
    };
    paths = lib.optionalAttrs cfg.agent.enable agentPrograms;
  };

  mergedSettings = lib.recursiveUpdate typedSettings cfg.settings;
  finalSettings =
    if mergedSettings ? flakehub.token_file then
      lib.recursiveUpdate mergedSettings {
        flakehub.token_file = pathAsString mergedSettings.flakehub.token_file;
      }
    else
      mergedSettings;

  renderedConfig = settingsFormat.generate "hcloud-nixos-agent.toml" finalSettings;

  # The agent's own parser checks the file at build time, so a bad setting fails nixos-rebuild
  # instead of the server. `config check` reads no token file and runs no program; the store paths
  # the file names are in the sandbox (they are the file's references). A cross build cannot run
  # the host's binary on the build machine: there the file is installed unchecked.
  canRunHostBinary = pkgs.stdenv.buildPlatform.canExecute pkgs.stdenv.hostPlatform;
  configFile =
    if cfg.checkConfig && canRunHostBinary then
      pkgs.runCommand "hcloud-nixos-agent.toml"
        {
          preferLocalBuild = true;
          passthru.unchecked = renderedConfig;
        }
        ''
          if ! ${lib.getExe' cfg.package "hcloud-nixos"} config check ${renderedConfig} > check.out 2> check.err; then
            echo "hcloud-nixos: the agent configuration rendered from services.hcloud-nixos is not valid:" >&2
            cat check.out check.err >&2
            exit 1
          fi
          cat check.out
          cp ${renderedConfig} $out
        ''
    else
      renderedConfig;

  # Each unit file of units/ that this configuration uses, with the store paths filled in: the very
  # files the tests run under systemd on a development machine. Only enabled units are installed,
  # so a release whose configuration turns the agent off has no agent unit (the agent checks a new
  # release for it before activating it).
  useUnitFirewall = cfg.restrictMetadataService && !config.networking.nftables.enable;
  unitNames =
    lib.optional cfg.network.enable "hcloud-nixos-network.service"
    ++ lib.optional cfg.agent.enable "hcloud-nixos-agent.service"
    ++ lib.optional useUnitFirewall "hcloud-nixos-metadata-firewall.service";
  # The PATH NixOS writes into the agent's overrides.conf, written into the unit file too, so that
  # the file says what the service really gets.
  agentUnitPath = if cfg.agent.enable then config.systemd.services.hcloud-nixos-agent.environment.PATH else "";
  units = pkgs.runCommand "hcloud-nixos-units" { passthru.unitNames = unitNames; } ''
    mkdir -p $out/lib/systemd/system $out/share/hcloud-nixos
    cp ${./metadata-firewall.nft} $out/share/hcloud-nixos/metadata-firewall.nft
    for unit in ${lib.escapeShellArgs unitNames}; do
      substitute "${./units}/$unit" "$out/lib/systemd/system/$unit" \
        --subst-var-by hcloudNixos ${cfg.package} \
        --subst-var-by kill ${lib.getExe' pkgs.coreutils "kill"} \
        --subst-var-by path ${lib.escapeShellArg agentUnitPath} \
        --subst-var-by nft ${lib.getExe' pkgs.nftables "nft"} \
        --subst-var-by rules $out/share/hcloud-nixos/metadata-firewall.nft
    done
  '';

  # The metadata firewall's rules, one source for both ways of loading them: the unit loads the
  # whole file; with networking.nftables.enable the chains (the body of the table) go into
  # networking.nftables.tables, because nftables.service replaces the whole ruleset on every start
  # and reload (`flush ruleset` with a hand-written ruleset, nixos/modules/services/networking/
  # nftables.nix) and re-creates only the tables it knows.
  firewallTable = "hcloud_nixos_metadata";
  firewallChains =
    let
      lines = lib.splitString "\n" (builtins.readFile ./metadata-firewall.nft);
      indexed = lib.imap0 (i: line: { inherit i line; }) lines;
      opening = lib.filter (x: x.line == "table inet ${firewallTable} {") indexed;
      closing = lib.filter (x: x.line == "}") indexed;
      from = (lib.head opening).i + 1;
      to = (lib.last closing).i;
    in
    if opening == [ ] || closing == [ ] || to <= from then
      throw "nixos-module/metadata-firewall.nft: expected a `table inet ${firewallTable} {` block closed by `}` at the start of a line"
    else
      lib.concatStringsSep "\n" (lib.sublist from (to - from) lines);

  healthCheck = types.submodule {
    options = {
      command = mkOption {
        type = types.nullOr (types.listOf types.str);
        default = null;
        example = [
          "/run/current-system/sw/bin/systemctl"
          "is-active"
          "web.service"
        ];
        description = "A command (argv, no shell) that must exit 0. Give either this or `url`.";
      };
      url = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "http://127.0.0.1:8080/healthz";
        description = "A URL that must answer with a 2xx status. Give either this or `command`.";
      };
      timeout = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "10s";
        description = "How long one run of this check may take (the agent's default: 10s).";
      };
    };
  };

  # What is wrong with a FlakeHub token file setting (null: nothing).
  tokenFileProblem =
    where: v:
    if builtins.isPath v then
      "${where} is the path literal ${toString v}: Nix copies a path literal into the world-readable /nix/store, and with it the FlakeHub token. Give the file's location on the server as a string instead, e.g. \"/run/secrets/flakehub\" (a file that sops-nix, agenix or systemd credentials put there, readable by root only)."
    else if !builtins.isString v then
      "${where} must be a string: the absolute path of a file on the server, e.g. \"/run/secrets/flakehub\"."
    else if
      lib.hasPrefix "${builtins.storeDir}/" v || v == builtins.storeDir || builtins.hasContext v
    then
      "${where} = \"${builtins.unsafeDiscardStringContext v}\" is in the Nix store, which every user can read: the token is already exposed there. Keep the token out of the store and give the file's location on the server, e.g. \"/run/secrets/flakehub\"."
    else if !lib.hasPrefix "/" v then
      "${where} = \"${v}\" is not an absolute path: give the file's location on the server, e.g. \"/run/secrets/flakehub\"."
    else
      null;

  tokenAssertions =
    let
      fromOption =
        if cfg.tokenFile == null then null else tokenFileProblem "services.hcloud-nixos.tokenFile" cfg.tokenFile;
      fromSettings =
        if cfg.settings ? flakehub.token_file then
          tokenFileProblem "services.hcloud-nixos.settings.flakehub.token_file" cfg.settings.flakehub.token_file
        else
          null;
    in
    map (message: {
      assertion = false;
      inherit message;
    }) (lib.filter (m: m != null) [ fromOption fromSettings ]);

  healthCheckAssertions = lib.imap0 (
    i: check:
    let
      where = "services.hcloud-nixos.healthChecks[${toString i}]";
    in
    if check.command != null && check.url != null then
      {
        assertion = false;
        message = "${where} has both `command` and `url`: a check is one or the other. Make two checks.";
      }
    else if check.command == null && check.url == null then
      {
        assertion = false;
        message = "${where} has neither `command` nor `url`: give a command (argv, no shell), e.g. command = [ \"/run/current-system/sw/bin/systemctl\" \"is-active\" \"web.service\" ], or a url that must answer with a 2xx status.";
      }
    else if check.command == [ ] then
      {
        assertion = false;
        message = "${where}.command is empty: give the program and its arguments, e.g. [ \"/run/current-system/sw/bin/systemctl\" \"is-active\" \"web.service\" ].";
      }
    else
      {
        assertion = true;
        message = "";
      }
  ) cfg.healthChecks;

  emptyDaysAt =
    if cfg.reboot.window.days == [ ] then
      "services.hcloud-nixos.reboot.window.days"
    else if cfg.settings ? reboot_window.days && cfg.settings.reboot_window.days == [ ] then
      "services.hcloud-nixos.settings.reboot_window.days"
    else
      null;
in
{
  options.services.hcloud-nixos = {
    enable = mkEnableOption "hcloud-nixos: network, hostname and SSH keys from the Hetzner metadata service, and the deploy agent";

    package = mkOption {
      type = types.package;
      description = "The hcloud-nixos package (the flake's modules set it to the flake's own).";
    };

    fhPackage = lib.mkPackageOption pkgs "fh" {
      extraDescription = ''
        The FlakeHub CLI the agent runs to fetch each release (`fh apply nixos`); also installed
        for operators. The flake's modules set it to the flake's `fh` input.
      '';
    };

    determinateNixdPackage = mkOption {
      type = types.nullOr types.package;
      default = null;
      example = literalExpression "inputs.determinate.packages.\${pkgs.stdenv.hostPlatform.system}.default";
      description = ''
        determinate-nixd, with which the agent logs the machine in to FlakeHub. `null` (upstream
        Nix): the agent writes the token to fh's own token file instead. The flake's
        `nixosModules.default` sets it whenever Determinate Nix is enabled (`determinate.enable`).
      '';
    };

    network.enable = mkOption {
      type = types.bool;
      default = true;
      description = ''
        Configure static IPv6 (systemd-networkd files), the hostname and root's SSH keys from the
        metadata service at every boot (`hcloud-nixos-network`, the same as `hcloud-nixos network`).
      '';
    };

    agent.enable = mkOption {
      type = types.bool;
      default = true;
      description = ''
        Run the deploy agent, which follows a FlakeHub output reference. A release that turns it off
        (or lacks this module) is refused by the running agent unless its configuration says
        `apply.require_agent = false`.
      '';
    };

    restrictMetadataService = mkOption {
      type = types.bool;
      default = true;
      description = ''
        Let only root reach the metadata service (169.254.169.254), and no routed guest
        (containers, VMs) at all. It serves the user-data, and with it the FlakeHub token, to any
        process that asks. The rules are an nftables table of their own: loaded by a unit of their
        own beside the iptables firewall (re-loaded when firewall.service restarts or reloads), or
        declared in `networking.nftables.tables` when `networking.nftables.enable` is set. Turning
        it off takes effect at the next boot with the unit (the table is kept when the unit
        stops), at once with nftables.
      '';
    };

    checkConfig = mkOption {
      type = types.bool;
      default = true;
      description = ''
        Check the rendered agent configuration with `hcloud-nixos config check` at build time, so
        that a bad setting fails `nixos-rebuild` instead of the server. Skipped in cross builds.
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
      # A path literal is accepted by the type only to be refused with a clear message (see the
      # assertions): it would copy the token into the store.
      type = types.nullOr (types.either types.str types.path);
      default = null;
      example = "/run/secrets/flakehub";
      description = ''
        Location on the server of a file holding the FlakeHub token, as a string; wins over the
        token in user-data. Never a path literal (`./token`) or a store path: those put the token
        into the world-readable Nix store, and evaluation fails.
      '';
    };

    pollInterval = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "60s";
      description = "How often to ask FlakeHub for a new release (the agent's default: 60s).";
    };

    operation = mkOption {
      type = types.nullOr (
        types.enum [
          "switch"
          "boot"
          "test"
        ]
      );
      default = null;
      example = "switch";
      description = "What a new release is activated with (the agent's default: switch).";
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
      description = "Apply a release only once it has been published this long (0s on canaries).";
    };

    healthChecks = mkOption {
      type = types.listOf healthCheck;
      default = [ ];
      example = literalExpression ''[ { url = "http://127.0.0.1:8080/healthz"; timeout = "10s"; } ]'';
      description = "Checks that must pass after a deploy; any failure rolls it back. Each has `command` or `url`, not both.";
    };

    reboot = {
      policy = mkOption {
        type = types.nullOr (
          types.enum [
            "never"
            "when-needed"
            "window"
          ]
        );
        default = null;
        example = "window";
        description = "When to reboot into a new kernel: never, right after the deploy, or inside a window (the agent's default: never; user-data may set it).";
      };
      # Every key is rendered when set, whatever the policy (which may come from user-data);
      # unset keys are left to the agent's defaults.
      window = {
        days = mkOption {
          type = types.nullOr (types.listOf (types.enum dayNames));
          default = null;
          example = [
            "Sat"
            "Sun"
          ];
          description = "Days on which the maintenance window opens (the agent's default: Sat, Sun). Not an empty list.";
        };
        start = mkOption {
          type = types.nullOr types.str;
          default = null;
          example = "02:00";
          description = "Local time at which the window opens (the agent's default: 02:00).";
        };
        length = mkOption {
          type = types.nullOr types.str;
          default = null;
          example = "2h";
          description = "How long the window stays open (the agent's default: 2h).";
        };
        timeZone = mkOption {
          type = types.nullOr types.str;
          default = null;
          example = "Europe/Berlin";
          description = "IANA time zone of `start` (the agent's default: UTC).";
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

    agentSettings = mkOption {
      type = types.attrsOf types.anything;
      internal = true;
      readOnly = true;
      default = finalSettings;
      defaultText = literalExpression "the typed options with `settings` merged over them";
      description = "What is rendered into /etc/hcloud-nixos/agent.toml (for checks and `nixos-option`).";
    };
  };

  config = mkIf cfg.enable (
    lib.mkMerge [
      {
        assertions = [
          {
            assertion =
              !cfg.network.enable || config.networking.useNetworkd || config.systemd.network.enable;
            message = "services.hcloud-nixos.network needs systemd-networkd (networking.useNetworkd = true).";
          }
          {
            assertion = emptyDaysAt == null;
            message = "${toString emptyDaysAt} is [ ]: an empty list does not mean \"never\", the agent would fall back to its default days (Sat, Sun). List the days (e.g. [ \"Sat\" ]), leave it null for the default, or set reboot.policy = \"never\".";
          }
          {
            assertion =
              !(cfg.agent.enable && (config.determinate.enable or false) && cfg.determinateNixdPackage == null);
            message = "Determinate Nix is enabled (determinate.enable) but services.hcloud-nixos.determinateNixdPackage is null: the agent would log in through fh's token file, which fh does not read while determinate-nixd runs. Use the flake's nixosModules.default (it sets the package), or set determinateNixdPackage = inputs.determinate.packages.\${pkgs.stdenv.hostPlatform.system}.default.";
          }
        ]
        ++ tokenAssertions
        ++ healthCheckAssertions;

        environment.systemPackages = [ cfg.package ];
        systemd.packages = [ units ];

        # The metadata's keys, in a file of their own: keys a user put in ~/.ssh/authorized_keys
        # stay.
        services.openssh.authorizedKeysFiles = mkIf cfg.network.enable [
          "/run/hcloud-nixos/authorized_keys/%u"
        ];
      }

      (mkIf cfg.network.enable {
        systemd.services.hcloud-nixos-network.wantedBy = [ "multi-user.target" ];
      })

      (mkIf cfg.agent.enable {
        # fh for operators (the seed images' way of deploying by hand), git as the seed images ship
        # it (flake references to git repositories).
        environment.systemPackages = [
          cfg.fhPackage
          pkgs.git
        ];

        systemd.services.hcloud-nixos-agent = {
          wantedBy = [ "multi-user.target" ];
          # A changed configuration is re-read (SIGHUP), never a restart in the middle of an
          # apply.
          reloadTriggers = [ configFile ];
          # Ends up in overrides.conf's PATH next to NixOS's default path: for what the agent's
          # programs run in turn (fh runs `nix` and `nix-store` from PATH).
          path = agentPackages;
        };

        environment.etc."hcloud-nixos/agent.toml".source = configFile;
      })

      (mkIf useUnitFirewall {
        systemd.services.hcloud-nixos-metadata-firewall.wantedBy = [ "sysinit.target" ];
      })

      (mkIf (cfg.restrictMetadataService && config.networking.nftables.enable) {
        networking.nftables.tables.${firewallTable} = {
          family = "inet";
          content = firewallChains;
        };
      })
    ]
  );
}
