# NixOS VM test (the flake's `checks.<system>.vm`): a server boots with hcloud-nixos against
# stand-ins for the Hetzner metadata service, its DHCP and FlakeHub on a neighbouring VM, and
#   1. gets its IPv4 address by DHCP and its IPv6 address, default route, hostname and SSH keys
#      from the files `hcloud-nixos network` writes (nothing of NixOS claims the NIC, so networkd
#      applies the agent's 50-hcloud-nixos-public-*.network, and the test says so);
#   2. lets only root reach 169.254.169.254;
#   3. runs the agent as NixOS installs it (overrides.conf with NixOS's PATH; the programs named by
#      store path in agent.toml) and deploys its first release through fh;
#   4. refuses a release whose configuration lacks the hcloud-nixos module: the status says so,
#      the running system and the system profile stay what they were.
# It needs KVM and nixpkgs; on the development machines it is only parsed (tests/nix_files.rs)
# and read, never run (docs/nixos.md, "Checked here, and not").
#
# `module` is the flake's nixosModules.upstreamNix: determinate-nixd would log in at FlakeHub
# itself, which the stand-in is not; with upstream Nix the agent writes the token to fh's own
# token file, which the fh stand-in reads.
{ pkgs, module }:

let
  # The test driver gives each NIC the MAC 52:54:00:12:<vlan>:<node number> (nixos/lib/
  # qemu-common.nix, qemuNicMac); nodes are numbered alphabetically: metadata 1, server 2.
  serverMac = "52:54:00:12:01:02";
  token = "flakehub1_vmtest";
  key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBjYTHGYkNK7DZ4Gn0NGN1sjFUVapus4GXybEYg/ylcA vm@test";

  metadata = builtins.toJSON {
    hostname = "my-nixos-server";
    instance-id = 4242;
    public-keys = [ key ];
    network-config = {
      version = 1;
      config = [
        {
          type = "physical";
          name = "eth0";
          mac_address = serverMac;
          subnets = [
            {
              type = "dhcp";
              ipv4 = true;
            }
            {
              type = "static";
              ipv6 = true;
              address = "2a01:4f8:c012:abcd::1/64";
              gateway = "fe80::1";
              dns_nameservers = [ "2a01:4ff:ff00::add:1" ];
            }
          ];
        }
      ];
    };
  };
  userdata = ''
    #cloud-config
    hcloud_nixos:
      flakehub_token: ${token}
      flake: org/infra/0.1#nixosConfigurations.server
      poll_interval: 10s
  '';

  # JSON is YAML, so the metadata document can be served as JSON text. The release FlakeHub
  # offers is written by the test into /srv/flakehub/release ("<version> <store path>").
  standins = pkgs.writeText "standins.py" ''
    import http.server, json, sys, threading

    DOCS = {
        "/hetzner/v1/metadata": ${builtins.toJSON metadata},
        "/hetzner/v1/metadata/private-networks": "[]",
        "/hetzner/v1/userdata": ${builtins.toJSON userdata},
    }
    TOKEN = "${token}"

    def release():
        try:
            version, store_path = open("/srv/flakehub/release").read().split()
            return version, store_path
        except (FileNotFoundError, ValueError):
            return None

    class Metadata(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = DOCS.get(self.path)
            self.send_response(200 if body is not None else 404)
            self.end_headers()
            if body is not None:
                self.wfile.write(body.encode())

    class FlakeHub(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.headers.get("Authorization") != "Bearer " + TOKEN:
                self.send_response(401); self.end_headers(); return
            path = self.path.split("?")[0]
            current = release()
            if current is None:
                self.send_response(404); self.end_headers(); return
            version, store_path = current
            if path.startswith("/version/org/infra/"):
                body = {"version": version, "published_at": "2026-01-01T00:00:00Z", "yanked_at": None}
            elif path.startswith("/f/org/infra/") and "/output/" in path:
                body = {"attribute_path": "nixosConfigurations.server", "store_path": store_path}
            else:
                self.send_response(404); self.end_headers(); return
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(data)

    servers = [
        http.server.ThreadingHTTPServer(("169.254.169.254", 80), Metadata),
        http.server.ThreadingHTTPServer(("169.254.169.254", 8080), FlakeHub),
    ]
    for s in servers[1:]:
        threading.Thread(target=s.serve_forever, daemon=True).start()
    servers[0].serve_forever()
  '';

  # fh as documented: resolve through FlakeHub, set the system profile, run
  # switch-to-configuration and ignore its exit status. `nix-env` is taken from PATH, as the real
  # fh runs `nix`: it is found only because the agent hands its transient units a PATH with the
  # directories of its programs first.
  fhStandin = pkgs.writeShellScriptBin "fh" ''
    set -eu
    [ "$1 $2" = "apply nixos" ] || { echo "Error: unexpected arguments: $*" >&2; exit 2; }
    ref="$3"; action="''${4:-switch}"
    attr="''${ref#*#}"; version="''${ref%%#*}"; version="''${version##*/}"
    hdr=$(umask 077; mktemp); printf 'Authorization: Bearer %s\n' "$(cat /root/.config/flakehub/auth)" > "$hdr"
    store_path=$(${pkgs.curl}/bin/curl -fsS -H @"$hdr" \
      "http://169.254.169.254:8080/f/org/infra/$version/output/$attr" | ${pkgs.jq}/bin/jq -r .store_path)
    rm -f "$hdr"
    nix-env -p /nix/var/nix/profiles/system --set "$store_path"
    "$store_path/bin/switch-to-configuration" "$action" || true
  '';
in
pkgs.testers.runNixOSTest {
  name = "hcloud-nixos";

  # The metadata service, the DHCP server and FlakeHub, as Hetzner's network shows them to a
  # server: the gateway 172.31.1.1 hands out the IPv4 address and routes to 169.254.169.254.
  nodes.metadata = {
    # A NIC on vlan 1 without the test driver's address (assignIP is off for
    # virtualisation.interfaces); its addresses are Hetzner's.
    virtualisation.interfaces.eth1.vlan = 1;
    networking.useDHCP = false;
    networking.interfaces.eth1.ipv4.addresses = [
      # 169.254.0.0/16 on the link: the server reaches the service from the temporary address
      # `hcloud-nixos network` borrows at boot (169.254.0.1/16).
      {
        address = "169.254.169.254";
        prefixLength = 16;
      }
      {
        address = "172.31.1.1";
        prefixLength = 24;
      }
    ];
    networking.firewall.enable = false;
    services.dnsmasq = {
      enable = true;
      resolveLocalQueries = false;
      settings = {
        port = 0; # DHCP only, no DNS
        interface = "eth1";
        dhcp-range = [ "172.31.1.100,172.31.1.150,255.255.255.0,1h" ];
        dhcp-option = [ "option:router,172.31.1.1" ];
        dhcp-authoritative = true;
      };
    };
    systemd.services.standins = {
      wantedBy = [ "multi-user.target" ];
      after = [ "network.target" ];
      script = "mkdir -p /srv/flakehub; exec ${pkgs.python3}/bin/python3 ${standins}";
    };
  };

  nodes.server =
    { lib, ... }:
    {
      imports = [ module ];
      environment.systemPackages = [ pkgs.curl ];
      # As on Hetzner: one NIC, no address of its own. No user-mode (SLiRP) NIC: it would be the
      # first ethernet link, the one `hcloud-nixos network` borrows at boot. Declared through
      # virtualisation.interfaces (assignIP off), not virtualisation.vlans: the test driver then
      # sets no networking.interfaces.eth0 (nixos/lib/testing/network.nix), so NixOS writes no
      # 40-eth0.network (nixos/modules/tasks/network-interfaces-systemd.nix), which would win
      # over the agent's 50-hcloud-nixos-public-<mac>.network.
      virtualisation.qemu.networkingOptions = lib.mkForce [ ];
      virtualisation.interfaces.eth0.vlan = 1;
      networking.useNetworkd = true;
      # No catch-all DHCP either: the IPv4 lease comes only through the agent's file.
      networking.useDHCP = false;
      # No static hostname: the metadata's one is taken.
      networking.hostName = lib.mkForce "";
      networking.firewall.enable = false;
      services.openssh.enable = true;
      services.hcloud-nixos = {
        enable = true;
        fhPackage = fhStandin;
        settings.flakehub.api_url = "http://169.254.169.254:8080";
      };
      # The first release: this very system with a marker, ready in the store.
      specialisation.release.configuration.environment.etc."hcloud-nixos-release".text = "0.1.1";
      # A release without hcloud-nixos: deploying it would end deploys on this server.
      specialisation.bare.configuration = {
        environment.etc."hcloud-nixos-release".text = "0.1.2";
        services.hcloud-nixos.enable = lib.mkForce false;
      };
    };

  testScript = ''
    metadata.start()
    metadata.wait_for_unit("standins.service")
    metadata.wait_for_unit("dnsmasq.service")
    server.start()

    # Read before the first deploy: a specialisation's system has no specialisations of its own.
    release = server.succeed("readlink -f /run/current-system/specialisation/release").strip()
    bare = server.succeed("readlink -f /run/current-system/specialisation/bare").strip()

    def offer(version, store_path):
        metadata.succeed(
            f"echo '{version} {store_path}' > /srv/flakehub/release.tmp"
            " && mv /srv/flakehub/release.tmp /srv/flakehub/release"
        )

    with subtest("boot: the agent's networkd file applies; IPv4 by DHCP, IPv6, route, hostname, keys"):
        server.wait_for_unit("hcloud-nixos-network.service")
        server.succeed("test ! -e /etc/systemd/network/40-eth0.network")
        server.wait_until_succeeds("ip -4 addr show dev eth0 | grep -q 'inet 172.31.1.'")
        server.succeed("networkctl status eth0 | grep -q 'Network File: /run/systemd/network/50-hcloud-nixos-public-'")
        server.wait_until_succeeds("ip -6 addr show dev eth0 | grep -q 2a01:4f8:c012:abcd::1/64")
        server.wait_until_succeeds("ip -6 route show default | grep -q 'via fe80::1 dev eth0'")
        server.succeed('test "$(hostname)" = my-nixos-server')
        server.succeed("grep -q 'vm@test' /run/hcloud-nixos/authorized_keys/root")
        server.succeed('test "$(stat -c %a /run/hcloud-nixos/authorized_keys/root)" = 600')

    with subtest("only root reaches the metadata service"):
        server.succeed("curl -fsS --max-time 10 http://169.254.169.254/hetzner/v1/metadata")
        server.fail("setpriv --reuid=65534 --regid=65534 --clear-groups curl -fsS --max-time 5 http://169.254.169.254/hetzner/v1/metadata")

    with subtest("the agent as NixOS installs it: NixOS's PATH in overrides.conf, programs by store path"):
        server.succeed("grep -q '^Environment=\"PATH=.*-fh/bin:' /etc/systemd/system/hcloud-nixos-agent.service.d/overrides.conf")
        server.succeed("grep -q '/nix/store/.*-fh/bin/fh' /etc/hcloud-nixos/agent.toml")
        server.succeed("grep -q '/nix/store/.*/bin/nix-env' /etc/hcloud-nixos/agent.toml")
        server.fail("grep -q determinate_nixd /etc/hcloud-nixos/agent.toml")

    with subtest("first deploy"):
        offer("0.1.1", release)
        server.succeed("hcloud-nixos check")
        server.wait_until_succeeds("hcloud-nixos status | grep -q 'up to date: 0.1.1'", timeout=120)
        server.succeed("grep -q 0.1.1 /etc/hcloud-nixos-release")
        server.fail("journalctl -b | grep -q ${token}")

    with subtest("a release without the hcloud-nixos module is refused"):
        server.succeed(f"test ! -e {bare}/etc/systemd/system/hcloud-nixos-agent.service")
        offer("0.1.2", bare)
        server.succeed("hcloud-nixos check")
        server.wait_until_succeeds(
            "hcloud-nixos status | grep -q 'does not include the hcloud-nixos module'", timeout=120
        )
        server.succeed("grep -q 0.1.1 /etc/hcloud-nixos-release")
        server.succeed("systemctl is-active hcloud-nixos-agent.service")
        server.succeed('test "$(readlink -f /nix/var/nix/profiles/system)" = "$(readlink -f /run/current-system)"')
  '';
}
