# The NixOS module evaluated with nixpkgs' own module system (`lib.evalModules`), with only
# nixpkgs' lib/: run by tests/nixos/eval.sh, which prints one line per check.
#
# What is real: lib (the module system, option types, mkIf/mkMerge/mkDefault priorities, lib's
# string and list functions), nixos-module/default.nix and nixos-module/flake-module.nix as the
# flake uses them, the rules file and the unit files' names.
# What is modelled (read from nixpkgs, written here as small stubs): the NixOS options the module
# sets, each declared loosely; `pkgs` (fake derivations: a name and a store path, nothing
# buildable; `formats.toml` keeps the value it is given; `runCommand` keeps its script);
# DeterminateSystems/determinate's NixOS module (sets nix.package); and what NixOS does with a
# service defined both in `systemd.packages` and `systemd.services` (the PATH in overrides.conf).
# Nothing is built, and no real NixOS module runs: see docs/nixos.md, "Checked here, and not".
#
# `nixpkgsLib`: the directory holding nixpkgs' lib (its default.nix), e.g. a checkout of
# github:nix-community/nixpkgs.lib with `/lib` appended; null fetches that repository (needs the
# network).
{
  nixpkgsLib ? null,
}:

let
  libDir =
    if nixpkgsLib != null then
      nixpkgsLib
    else
      "${builtins.fetchTarball "https://github.com/nix-community/nixpkgs.lib/archive/master.tar.gz"}/lib";
  lib = import libDir;
  inherit (lib) mkOption types;

  system = "x86_64-linux";
  storeDir = builtins.storeDir;

  # A stand-in derivation: a name and a store path (a hash of the name), nothing to build.
  fake =
    name:
    let
      self = {
        type = "derivation";
        inherit name;
        outPath = "${storeDir}/${builtins.substring 0 32 (builtins.hashString "sha256" name)}-${name}";
        drvPath = "${storeDir}/${builtins.substring 0 32 (builtins.hashString "sha1" name)}-${name}.drv";
        outputName = "out";
        outputs = [ "out" ];
        out = self;
        meta = { };
      };
    in
    self;

  # The stub package set. Its `runCommand` keeps the script and lifts `passthru` the way
  # mkDerivation does; `formats.toml` follows nixpkgs' pkgs/pkgs-lib/formats.nix (its value type)
  # and keeps the value it renders.
  makePkgs =
    {
      canExecute ? true,
    }:
    {
      inherit lib;
      stdenv = {
        hostPlatform = {
          inherit system;
        };
        buildPlatform = {
          inherit system;
          canExecute = _: canExecute;
        };
      };
      coreutils = fake "coreutils-9.8";
      findutils = fake "findutils-4.10.0";
      gnugrep = fake "gnugrep-3.12";
      gnused = fake "gnused-4.9";
      systemd = fake "systemd-258";
      nftables = fake "nftables-1.1.5";
      git = fake "git-2.51.0";
      fh = fake "fh-nixpkgs";
      nix = fake "nix-2.31.2";
      runCommand =
        name: env: script:
        fake name // removeAttrs env [ "passthru" ] // (env.passthru or { }) // { inherit script; };
      writeText = name: text: fake name // { inherit text; };
      formats.toml =
        { }:
        {
          type =
            let
              valueType =
                types.oneOf [
                  types.bool
                  types.int
                  types.float
                  types.str
                  types.path
                  (types.attrsOf valueType)
                  (types.listOf valueType)
                ]
                // {
                  description = "TOML value";
                };
            in
            valueType;
          generate = name: value: fake name // { inherit value; };
        };
    };

  # The NixOS options the module sets or reads, declared loosely, and what NixOS does with a
  # service: nixos/lib/systemd-lib.nix `stage2ServiceConfig` appends the default path (coreutils,
  # findutils, gnugrep, gnused, systemd) to every service's `path` (mkAfter), and `serviceConfig`
  # sets `environment.PATH` from it (makeBinPath, then the sbin directories) when the path is not
  # empty, which it never is for a stage-2 service.
  nixosStubs =
    { config, pkgs, ... }:
    let
      nixos = config;
    in
    {
      options = {
        assertions = mkOption {
          type = types.listOf types.unspecified;
          default = [ ];
        };
        warnings = mkOption {
          type = types.listOf types.str;
          default = [ ];
        };
        environment.systemPackages = mkOption {
          type = types.listOf types.package;
          default = [ ];
        };
        environment.etc = mkOption {
          type = types.attrsOf (
            types.submodule {
              freeformType = types.attrsOf types.anything;
              options.source = mkOption { type = types.anything; };
            }
          );
          default = { };
        };
        systemd.package = mkOption {
          type = types.package;
          default = pkgs.systemd;
        };
        systemd.packages = mkOption {
          type = types.listOf types.package;
          default = [ ];
        };
        systemd.network.enable = mkOption {
          type = types.bool;
          default = false;
        };
        systemd.services = mkOption {
          default = { };
          type = types.attrsOf (
            types.submodule (
              { config, ... }:
              {
                freeformType = types.attrsOf types.anything;
                options = {
                  wantedBy = mkOption {
                    type = types.listOf types.str;
                    default = [ ];
                  };
                  reloadTriggers = mkOption {
                    type = types.listOf types.anything;
                    default = [ ];
                  };
                  path = mkOption {
                    type = types.listOf types.package;
                    default = [ ];
                  };
                  environment = mkOption {
                    type = types.attrsOf (types.nullOr types.str);
                    default = { };
                  };
                };
                config = {
                  path = lib.mkAfter [
                    pkgs.coreutils
                    pkgs.findutils
                    pkgs.gnugrep
                    pkgs.gnused
                    nixos.systemd.package
                  ];
                  environment.PATH = lib.mkIf (
                    config.path != [ ]
                  ) "${lib.makeBinPath config.path}:${lib.makeSearchPathOutput "bin" "sbin" config.path}";
                };
              }
            )
          );
        };
        networking.useNetworkd = mkOption {
          type = types.bool;
          default = false;
        };
        networking.nftables.enable = mkOption {
          type = types.bool;
          default = false;
        };
        networking.nftables.tables = mkOption {
          type = types.attrsOf (
            types.submodule {
              options.family = mkOption { type = types.str; };
              options.content = mkOption { type = types.lines; };
            }
          );
          default = { };
        };
        services.openssh.authorizedKeysFiles = mkOption {
          type = types.listOf types.str;
          default = [ ];
        };
        nix.package = mkOption {
          type = types.package;
          default = pkgs.nix;
        };
      };
    };
  # DeterminateSystems/determinate's NixOS module (modules/nixos.nix), as far as the agent
  # cares: `determinate.enable` (default true) sets nix.package to Determinate Nix and installs
  # determinate-nixd. It exposes no option for determinate-nixd's package.
  determinateNixd = fake "determinate-nixd-3.21.8";
  determinateStub =
    { config, lib, ... }:
    {
      options.determinate.enable = lib.mkEnableOption "Determinate Nix" // {
        default = true;
      };
      config = lib.mkIf config.determinate.enable {
        nix.package = fake "determinate-nix-3.21.8";
        environment.systemPackages = [ determinateNixd ];
      };
    };

  # The flake's inputs, as nixos-module/flake-module.nix uses them.
  inputs = {
    hcloudNixos.packages.${system} = {
      default = fake "hcloud-nixos-0.1.0";
      server = fake "hcloud-nixos-server-0.1.0";
    };
    fh.packages.${system}.default = fake "fh-0.1.28";
    determinate = {
      nixosModules.default = determinateStub;
      packages.${system}.default = determinateNixd;
    };
  };
  flakeModule =
    withDeterminate:
    import ../../nixos-module/flake-module.nix {
      inherit (inputs) hcloudNixos fh determinate;
      inherit withDeterminate;
    };
  modules = {
    default = flakeModule true;
    upstreamNix = flakeModule false;
    # The module file alone (no flake defaults), for what only it can get wrong.
    bare = ../../nixos-module/default.nix;
  };

  evalWith =
    {
      module ? modules.default,
      extra ? [ ],
      canExecute ? true,
    }:
    config:
    lib.evalModules {
      modules = [
        nixosStubs
        module
        { _module.args.pkgs = makePkgs { inherit canExecute; }; }
        {
          services.hcloud-nixos.enable = true;
          networking.useNetworkd = lib.mkDefault true;
        }
        config
      ]
      ++ extra;
    };

  # What nixos/modules/system/activation/top-level.nix does before anything is built:
  # lib.asserts.checkAssertWarn throws on failed assertions.
  toplevel =
    cfg:
    let
      failed = map (a: a.message) (lib.filter (a: !a.assertion) cfg.assertions);
    in
    if failed != [ ] then
      throw "\nFailed assertions:\n${lib.concatMapStringsSep "\n" (m: "- ${m}") failed}"
    else
      "toplevel evaluates";

  hasPrefix = lib.hasPrefix;
  agentUnit = "hcloud-nixos-agent.service";
  firewallUnit = "hcloud-nixos-metadata-firewall.service";

  # The checks of one evaluated configuration: a list of { name, ok, detail }.
  report =
    {
      determinate ? true,
      nftables ? false,
      agent ? true,
      checked ? true,
    }:
    result:
    let
      cfg = result.config;
      hc = cfg.services.hcloud-nixos;
      settings = hc.agentSettings;
      failed = map (a: a.message) (lib.filter (a: !a.assertion) cfg.assertions);
      unitsPkgs = lib.filter (p: p.name == "hcloud-nixos-units") cfg.systemd.packages;
      unitsPkg = lib.head unitsPkgs;
      installed = unitsPkg.unitNames;
      service = cfg.systemd.services.hcloud-nixos-agent;
      # overrides.conf: NixOS writes `Environment="PATH=..."` from the service's environment
      # (nixos/lib/systemd-lib.nix serviceToUnit), and generateUnits links it as
      # hcloud-nixos-agent.service.d/overrides.conf because the unit file itself comes from
      # systemd.packages (overrideStrategy asDropinIfExists).
      overridesPath = service.environment.PATH;
      overridesDirs = lib.splitString ":" overridesPath;
      programs = settings.paths or { };
      expectedPrograms = [
        "fh"
        "nix"
        "nix_env"
      ]
      ++ lib.optional determinate "determinate_nixd";
      agentToml = cfg.environment.etc."hcloud-nixos/agent.toml".source;
      check = name: ok: detail: { inherit name ok detail; };
    in
    [
      (check "evaluates with lib.evalModules" true "")
      (check "no failed assertion" (failed == [ ]) (lib.concatStringsSep "; " failed))
      (check "the system evaluates as NixOS's top-level would (assertions checked)" (
        builtins.tryEval (toplevel cfg)
      ).success "")
      (check "the units package is in systemd.packages once" (builtins.length unitsPkgs == 1) "")
    ]
    ++ lib.optionals agent [
      (check "agent unit installed (NixOS links it at <toplevel>/etc/systemd/system/${agentUnit})" (
        lib.elem agentUnit installed
      ) (toString installed))
      (check "agent wanted by multi-user.target" (service.wantedBy == [ "multi-user.target" ]) (
        toString service.wantedBy
      ))
      (check "agent.toml at <toplevel>/etc/hcloud-nixos/agent.toml (environment.etc)" (
        cfg.environment.etc ? "hcloud-nixos/agent.toml"
      ) "")
      (check "a changed agent.toml reloads the agent (reloadTriggers)" (
        service.reloadTriggers == [ agentToml ]
      ) "")
      (check "every program the agent runs is rendered: ${toString expectedPrograms}" (
        lib.all (p: programs ? ${p}) expectedPrograms && lib.attrNames programs == lib.sort (a: b: a < b) expectedPrograms
      ) (builtins.toJSON programs))
      (check "each program is an absolute store path, never looked up in PATH" (lib.all (
        p: hasPrefix "${storeDir}/" p
      ) (lib.attrValues programs)) (builtins.toJSON programs))
      (check "overrides.conf PATH (modelled) has NixOS's default path: coreutils ... systemd" (lib.all (
        n: lib.any (d: lib.hasInfix "-${n}" d) overridesDirs
      ) [ "coreutils" "findutils" "gnugrep" "gnused" "systemd" ]) overridesPath)
      (check "overrides.conf PATH starts with the agent's packages (fh finds nix there)" (
        let
          agentPackages = [
            hc.fhPackage
            cfg.nix.package
          ]
          ++ lib.optional determinate hc.determinateNixdPackage;
        in
        lib.take (builtins.length agentPackages) overridesDirs == map (p: "${p}/bin") agentPackages
        && lib.all (p: lib.elem (dirOf p) overridesDirs) (lib.attrValues programs)
      ) overridesPath)
      (check "the unit file's own PATH (@path@) is the PATH overrides.conf sets" (
        lib.hasInfix overridesPath unitsPkg.script
      ) "")
      (check "fh and git installed for operators" (
        lib.elem hc.fhPackage cfg.environment.systemPackages
        && lib.any (p: p.name or "" == "git-2.51.0") cfg.environment.systemPackages
      ) "")
      (
        if checked then
          check "agent.toml is the file `hcloud-nixos config check` passed at build time" (
            agentToml ? unchecked
            && agentToml.unchecked.value == settings
            && lib.hasInfix "/bin/hcloud-nixos config check ${agentToml.unchecked}" agentToml.script
          ) ""
        else
          check "agent.toml installed unchecked (the host's binary cannot run)" (
            !(agentToml ? unchecked) && agentToml.value == settings
          ) ""
      )
    ]
    ++ lib.optionals (!agent) [
      (check "no agent unit, no agent.toml, no programs rendered" (
        !(lib.elem agentUnit installed)
        && !(cfg.environment.etc ? "hcloud-nixos/agent.toml")
        && !(settings ? paths)
      ) (toString installed))
    ]
    ++ (
      if nftables then
        [
          (check "the table is declared in networking.nftables.tables, no unit of its own" (
            cfg.networking.nftables.tables ? hcloud_nixos_metadata && !(lib.elem firewallUnit installed)
          ) "")
          (check "the table body holds the output and forward chains, no table line" (
            let
              t = cfg.networking.nftables.tables.hcloud_nixos_metadata;
            in
            t.family == "inet"
            && lib.hasInfix "chain output" t.content
            && lib.hasInfix "hook forward" t.content
            && !(lib.hasInfix "table " t.content)
          ) "")
        ]
      else
        [
          (check "firewall unit installed and wanted by sysinit.target" (
            lib.elem firewallUnit installed
            && cfg.systemd.services.hcloud-nixos-metadata-firewall.wantedBy == [ "sysinit.target" ]
          ) (toString installed))
        ]
    );

  # Good configurations: each evaluates, has no failed assertion, passes its checks, and renders
  # settings that the agent's own parser accepts (eval.sh runs `hcloud-nixos config check --json`).
  scenarios = {
    minimal = { };
    upstream-nix = {
      eval.module = modules.upstreamNix;
      report.determinate = false;
    };
    # Every option of the module set.
    full.config.services.hcloud-nixos = {
      network.enable = true;
      agent.enable = true;
      restrictMetadataService = true;
      checkConfig = true;
      flake = "my-org/infra/0.1#nixosConfigurations.web";
      tokenFile = "/run/secrets/flakehub";
      pollInterval = "30s";
      operation = "boot";
      confirmTimeout = "90s";
      minReleaseAge = "2h";
      healthChecks = [
        {
          url = "http://127.0.0.1:8080/healthz";
          timeout = "5s";
        }
        {
          command = [
            "/run/current-system/sw/bin/systemctl"
            "is-active"
            "web.service"
          ];
        }
      ];
      reboot.policy = "window";
      reboot.window = {
        days = [
          "Sat"
          "Sun"
        ];
        start = "03:00";
        length = "90m";
        timeZone = "Europe/Berlin";
      };
      metrics.listen = "127.0.0.1:9945";
      metrics.textfile = "/var/lib/prometheus-node-exporter-text/hcloud-nixos.prom";
      settings = {
        retry_limit = 5;
        max_backoff = "5m";
        apply.timeout = "30m";
        apply.require_agent = true;
        reboot_grace = "2m";
      };
    };
    # The policy from user-data, the window in Nix: the window is rendered all the same.
    window-without-policy = {
      config.services.hcloud-nixos.reboot.window.start = "04:30";
      extra =
        s:
        [
          {
            name = "a window key is rendered without reboot.policy (which may come from user-data); unset keys are left to the agent";
            ok = s.reboot_window or null == { start = "04:30"; } && !(s ? reboot);
            detail = builtins.toJSON (s.reboot_window or null);
          }
        ];
    };
    nftables = {
      config.networking.nftables.enable = true;
      report.nftables = true;
    };
    agent-off = {
      config.services.hcloud-nixos.agent.enable = false;
      report.agent = false;
    };
    # A cross build: the host's binary cannot run on the build machine.
    cross = {
      eval.canExecute = false;
      report.checked = false;
    };
  };
  evalScenario = sc: evalWith (sc.eval or { }) (sc.config or { });
  good = lib.mapAttrs (
    _: sc:
    let
      r = evalScenario sc;
    in
    report (sc.report or { }) r ++ (sc.extra or (_: [ ])) r.config.services.hcloud-nixos.agentSettings
  ) scenarios;
  goodSettings = lib.mapAttrs (_: sc: (evalScenario sc).config.services.hcloud-nixos.agentSettings) scenarios;

  # Bad configurations: evaluating the top level must fail with `expect` in the message.
  bad = {
    token-path-literal = {
      config.services.hcloud-nixos.tokenFile = ./token;
      expect = "is the path literal";
    };
    token-path-literal-in-settings = {
      config.services.hcloud-nixos.settings.flakehub.token_file = ./token;
      expect = "settings.flakehub.token_file is the path literal";
    };
    token-store-path = {
      config.services.hcloud-nixos.tokenFile = "${storeDir}/0123456789abcdfghijklmnpqrsvwxyz-flakehub-token";
      expect = "is in the Nix store, which every user can read";
    };
    token-relative = {
      config.services.hcloud-nixos.tokenFile = "secrets/flakehub";
      expect = "is not an absolute path";
    };
    days-empty = {
      config.services.hcloud-nixos.reboot.window.days = [ ];
      expect = "hcloud-nixos.reboot.window.days is [ ]: an empty list does not mean \"never\"";
    };
    days-empty-in-settings = {
      config.services.hcloud-nixos.settings.reboot_window.days = [ ];
      expect = "settings.reboot_window.days is [ ]: an empty list does not mean \"never\"";
    };
    health-check-empty = {
      config.services.hcloud-nixos.healthChecks = [ { } ];
      expect = "healthChecks[0] has neither `command` nor `url`";
    };
    health-check-both = {
      config.services.hcloud-nixos.healthChecks = [
        { url = "http://127.0.0.1/healthz"; }
        {
          command = [ "/run/current-system/sw/bin/true" ];
          url = "http://127.0.0.1/healthz";
        }
      ];
      expect = "healthChecks[1] has both `command` and `url`";
    };
    health-check-empty-command = {
      config.services.hcloud-nixos.healthChecks = [ { command = [ ]; } ];
      expect = "healthChecks[0].command is empty";
    };
    determinate-without-nixd = {
      module = modules.bare;
      config = {
        imports = [ determinateStub ];
        services.hcloud-nixos.package = fake "hcloud-nixos-0.1.0";
      };
      expect = "services.hcloud-nixos.determinateNixdPackage is null";
    };
  };
  badResult =
    name: b:
    let
      r = evalWith { module = b.module or modules.default; } b.config;
    in
    {
      toplevel = toplevel r.config;
      inherit (b) expect;
      # What is rendered for the token file: never a store path (a path literal is rendered by
      # name, not copied).
      tokenFileRendered = r.config.services.hcloud-nixos.agentSettings.flakehub.token_file or null;
    };
  # One line per check, tab-separated: scenario, PASS or FAIL, check, detail (on failures).
  goodReport = lib.concatStrings (
    lib.mapAttrsToList (
      scenario: checks:
      lib.concatMapStrings (
        c:
        "${scenario}\t${if c.ok then "PASS" else "FAIL"}\t${c.name}\t${
          if c.ok then "" else lib.replaceStrings [ "\n" "\t" ] [ " " " " ] c.detail
        }\n"
      ) checks
    ) good
  );
in
{
  libVersion = lib.version;
  inherit good goodSettings goodReport;
  goodNames = lib.attrNames scenarios;
  goodSettingsJSON = lib.mapAttrs (_: builtins.toJSON) goodSettings;
  bad = lib.mapAttrs badResult bad;
  badNames = lib.attrNames bad;
}
