# NixOS VM test (the flake's `checks.<system>.vm`): a server boots with hcloud-nixos against
# stand-ins for the Hetzner metadata service and FlakeHub on a neighbouring VM, and gets its IPv6
# address, default route, hostname and SSH keys, then deploys its first release through fh.
# It needs KVM and nixpkgs; on the development machines it is only parsed (see the README).
{ pkgs, module }:

let
  # The test driver gives the second VM (alphabetical order: metadata, server) this MAC on vlan 1.
  serverMac = "52:54:00:12:01:02";
  token = "flakehub1_vmtest";
  key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBjYTHGYkNK7DZ4Gn0NGN1sjFUVapus4GXybEYg/ylcA vm@test";

  metadata = builtins.toJSON {
    hostname = "my-nixos-server";
    instance-id = 4242;
    public-keys = [ key ];
    network-config = {
      version = 1;
      config = [{
        type = "physical";
        name = "eth0";
        mac_address = serverMac;
        subnets = [
          { type = "dhcp"; ipv4 = true; }
          {
            type = "static";
            ipv6 = true;
            address = "2a01:4f8:c012:abcd::1/64";
            gateway = "fe80::1";
            dns_nameservers = [ "2a01:4ff:ff00::add:1" ];
          }
        ];
      }];
    };
  };
  userdata = ''
    #cloud-config
    hcloud_nixos:
      flakehub_token: ${token}
      flake: org/infra/0.1#nixosConfigurations.server
      poll_interval: 10s
  '';

  # JSON is YAML, so the metadata document can be served as JSON text.
  standins = pkgs.writeText "standins.py" ''
    import http.server, json, sys, threading

    DOCS = {
        "/hetzner/v1/metadata": ${builtins.toJSON metadata},
        "/hetzner/v1/metadata/private-networks": "[]",
        "/hetzner/v1/userdata": ${builtins.toJSON userdata},
    }
    TOKEN = "${token}"

    def release():
        # The release's store path is written here by the test once the server has booted.
        try:
            return open("/srv/flakehub/store_path").read().strip()
        except FileNotFoundError:
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
            store_path = release()
            if store_path is None:
                self.send_response(404); self.end_headers(); return
            if path.startswith("/version/org/infra/"):
                body = {"version": "0.1.1", "published_at": "2026-01-01T00:00:00Z", "yanked_at": None}
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
  # switch-to-configuration and ignore its exit status.
  fhStandin = pkgs.writeShellScriptBin "fh" ''
    set -eu
    [ "$1 $2" = "apply nixos" ] || { echo "Error: unexpected arguments: $*" >&2; exit 2; }
    ref="$3"; action="''${4:-switch}"
    attr="''${ref#*#}"; version="''${ref%%#*}"; version="''${version##*/}"
    hdr=$(umask 077; mktemp); printf 'Authorization: Bearer %s\n' "$(cat /root/.config/flakehub/auth)" > "$hdr"
    store_path=$(${pkgs.curl}/bin/curl -fsS -H @"$hdr" \
      "http://169.254.169.254:8080/f/org/infra/$version/output/$attr" | ${pkgs.jq}/bin/jq -r .store_path)
    nix-env -p /nix/var/nix/profiles/system --set "$store_path"
    "$store_path/bin/switch-to-configuration" "$action" || true
  '';
in
pkgs.testers.runNixOSTest {
  name = "hcloud-nixos";

  nodes.metadata = { lib, ... }: {
    virtualisation.vlans = [ 1 ];
    networking.interfaces.eth1.ipv4.addresses = lib.mkForce [{ address = "169.254.169.254"; prefixLength = 16; }];
    networking.firewall.enable = false;
    systemd.services.standins = {
      wantedBy = [ "multi-user.target" ];
      after = [ "network.target" ];
      script = "mkdir -p /srv/flakehub; exec ${pkgs.python3}/bin/python3 ${standins}";
    };
  };

  nodes.server = { lib, ... }: {
    imports = [ module ];
    environment.systemPackages = [ pkgs.curl ];
    virtualisation.vlans = [ 1 ];
    # As after a DHCP lease: an IPv4 address from which 169.254.169.254 is reachable.
    networking.interfaces.eth1.ipv4.addresses = lib.mkForce [{ address = "169.254.10.2"; prefixLength = 16; }];
    networking.useNetworkd = true;
    networking.useDHCP = false;
    # No static hostname: the metadata's one is taken.
    networking.hostName = lib.mkForce "";
    networking.firewall.enable = false;
    services.openssh.enable = true;
    services.hcloud-nixos = {
      enable = true;
      settings = {
        flakehub.api_url = "http://169.254.169.254:8080";
        paths.fh = "${fhStandin}/bin/fh";
        # Upstream Nix here: the token goes to fh's own file.
        paths.determinate_nixd = "/nonexistent/determinate-nixd";
      };
    };
    # The first release: this very system with a marker, ready in the store.
    specialisation.release.configuration.environment.etc."hcloud-nixos-release".text = "0.1.1";
  };

  testScript = ''
    start_all()
    metadata.wait_for_unit("standins.service")

    with subtest("boot: IPv6, default route, hostname, SSH keys"):
        server.wait_for_unit("hcloud-nixos-network.service")
        server.wait_until_succeeds("ip -6 addr show dev eth1 | grep -q 2a01:4f8:c012:abcd::1/64")
        server.wait_until_succeeds("ip -6 route show default | grep -q 'via fe80::1 dev eth1'")
        server.succeed('test "$(hostname)" = my-nixos-server')
        server.succeed("grep -q 'vm@test' /run/hcloud-nixos/authorized_keys/root")
        server.succeed('test "$(stat -c %a /run/hcloud-nixos/authorized_keys/root)" = 600')

    with subtest("only root reaches the metadata service"):
        server.succeed("curl -fsS http://169.254.169.254/hetzner/v1/metadata")
        server.fail("setpriv --reuid=65534 --regid=65534 --clear-groups curl -fsS --max-time 5 http://169.254.169.254/hetzner/v1/metadata")

    with subtest("first deploy"):
        release = server.succeed("readlink -f /run/current-system/specialisation/release").strip()
        metadata.succeed(f"echo -n {release} > /srv/flakehub/store_path")
        server.succeed("hcloud-nixos check")
        server.wait_until_succeeds("hcloud-nixos status | grep -q 'up to date: 0.1.1'", timeout=120)
        server.succeed("test -e /etc/hcloud-nixos-release")
        server.fail("journalctl -b | grep -q ${token}")
  '';
}
