#!/bin/sh
# Provisions a device for the EdgeFleet agent: writes its id and its broker into the agent's
# config, installs the fleet CA and trust files, stores the enrollment endpoint and the one-time
# token where only root (and so systemd) can read them, checks the result and starts the agent,
# which enrolls on its first start. POSIX sh, for device images without bash.
#
#   provision.sh --device-id ID --controller https://HOST:8443 --mqtt mqtts://HOST:8883 \
#       --ca ca.pem --trust-root root-v1.cbor --keyring keyring.cbor [--root-chain a.cbor,b.cbor] \
#       [--token-file FILE] [--template agent.toml] [--root DIR] [--no-start]
#
# The token comes from --token-file, else $EDGEFLEET_ENROLL_TOKEN, else the first line of
# standard input; never from the command line, where other users could see it. With --root DIR
# the files go into an image's root filesystem instead of this system's (nothing is started).
# The config is the packaged /etc/edgefleet/agent.toml (or --template, e.g. the repository's
# agent/packaging/agent.toml), edited in place: only `device_id`, `trust.root_chain` and
# `mqtt.url` change, its comments stay. The enrollment settings go to /etc/edgefleet/agent.env,
# which the unit reads: they matter only until the device has enrolled, and admin commands such
# as `edgefleet-agent status` work without them.
set -eu

die() { echo "provision: error: $*" >&2; exit 2; }

device_id="" controller="" mqtt="" ca="" trust_root="" keyring="" root_chain="" token_file=""
template="" root="" start=yes
while [ $# -gt 0 ]; do
    [ $# -ge 2 ] || [ "$1" = --no-start ] || die "$1 needs a value"
    case "$1" in
        --device-id) device_id=$2; shift 2 ;;
        --controller) controller=$2; shift 2 ;;
        --mqtt) mqtt=$2; shift 2 ;;
        --ca) ca=$2; shift 2 ;;
        --trust-root) trust_root=$2; shift 2 ;;
        --keyring) keyring=$2; shift 2 ;;
        --root-chain) root_chain=$2; shift 2 ;;
        --token-file) token_file=$2; shift 2 ;;
        --template) template=$2; shift 2 ;;
        --root) root=${2%/}; start=no; shift 2 ;;
        --no-start) start=no; shift ;;
        *) die "unknown option $1 (see the comment at the top of $0)" ;;
    esac
done

# Check everything before writing anything.
for pair in "device-id:$device_id" "controller:$controller" "mqtt:$mqtt" "ca:$ca" \
    "trust-root:$trust_root" "keyring:$keyring"; do
    [ -n "${pair#*:}" ] || die "--${pair%%:*} is required"
done
printf '%s' "$device_id" | grep -Eq '^[A-Za-z0-9._-]{1,128}$' ||
    die "device id '$device_id' may use only letters, digits, '.', '_' and '-' (at most 128)"
printf '%s' "$controller" | grep -Eq '^https://[^"\\[:space:]]+$' ||
    die "--controller '$controller' must be the controller's device endpoint, https://HOST:PORT"
printf '%s' "$mqtt" | grep -Eq '^mqtts://[^"\\[:space:]]+:[0-9]+$' ||
    die "--mqtt '$mqtt' must be the broker, mqtts://HOST:PORT"
for file in "$ca" "$trust_root" "$keyring"; do
    [ -r "$file" ] || die "cannot read $file"
done
grep -q 'BEGIN CERTIFICATE' "$ca" || die "$ca is not a PEM certificate (the fleet CA, pki/ca.pem in the controller's data directory)"

etc="$root/etc/edgefleet"
config="$etc/agent.toml"
if [ -z "$template" ]; then
    [ -f "$config" ] || die "$config does not exist; install the edgefleet-agent package first, or give --template agent/packaging/agent.toml"
    template=$config
fi
[ -r "$template" ] || die "cannot read the config template $template"

if [ -n "$token_file" ]; then
    token=$(head -n 1 "$token_file")
elif [ -n "${EDGEFLEET_ENROLL_TOKEN:-}" ]; then
    token=$EDGEFLEET_ENROLL_TOKEN
else
    [ -t 0 ] && echo "provision: paste the enrollment token and press Enter:" >&2
    IFS= read -r token || true
fi
printf '%s' "$token" | grep -Eq '^[A-Za-z0-9._~+/=-]+$' ||
    die "no usable enrollment token (create one with 'edgefleet enroll-token create')"

# Trust files under the names the config uses; later root keyrings keep their own names.
umask 022
mkdir -p "$etc"
chain_toml=""
if [ -n "$root_chain" ]; then
    old_ifs=$IFS
    IFS=,
    for file in $root_chain; do
        [ -r "$file" ] || die "cannot read $file"
        name=$(basename "$file")
        cp "$file" "$etc/$name.tmp" && mv "$etc/$name.tmp" "$etc/$name"
        chain_toml="$chain_toml${chain_toml:+, }\"/etc/edgefleet/$name\""
    done
    IFS=$old_ifs
fi
for pair in "$ca:ca.pem" "$trust_root:root-v1.cbor" "$keyring:keyring.cbor"; do
    cp "${pair%:*}" "$etc/${pair##*:}.tmp"
    mv "$etc/${pair##*:}.tmp" "$etc/${pair##*:}"
done

# The config: the three settings replaced in place, then renamed over the old one.
awk -v device="$device_id" -v mqtt="$mqtt" -v chain="$chain_toml" '
    /^\[/ { section = $0 }
    section == "" && /^device_id = / { print "device_id = \"" device "\""; done++; next }
    section == "[trust]" && /^root_chain = / { print "root_chain = [" chain "]"; done++; next }
    section == "[mqtt]" && /^url = / { print "url = \"" mqtt "\""; done++; next }
    { print }
    END { if (done != 3) exit 3 }
' "$template" >"$config.tmp" ||
    { rm -f "$config.tmp"; die "$template lacks one of device_id, [trust] root_chain, [mqtt] url; use the packaged agent.toml"; }
chmod 0644 "$config.tmp"
mv "$config.tmp" "$config"

# Enrollment: root-only; the unit's EnvironmentFile= reads it before the agent starts.
(
    umask 077
    printf 'EDGEFLEET_ENROLL_URL=%s\nEDGEFLEET_ENROLL_TOKEN=%s\n' "$controller" "$token" >"$etc/agent.env.tmp"
)
mv "$etc/agent.env.tmp" "$etc/agent.env"
sync

echo "provision: wrote $config (device $device_id, broker $mqtt)"
echo "provision: wrote $etc/ca.pem, root-v1.cbor, keyring.cbor${root_chain:+ and the root chain}, and agent.env (0600: enrollment with $controller)"
if [ -e "$root/var/lib/edgefleet/device.pem" ]; then
    echo "provision: warning: $root/var/lib/edgefleet already holds an identity, so the agent will not enroll again; remove device.pem, device.key and mac.key there to re-enroll" >&2
fi
[ "$start" = yes ] || exit 0

agent=$(command -v edgefleet-agent || true)
[ -n "$agent" ] || die "edgefleet-agent is not installed (install the edgefleet-agent package)"
# As the service will see it: the config and the environment file.
EDGEFLEET_ENROLL_URL=$controller EDGEFLEET_ENROLL_TOKEN=$token "$agent" --config "$config" check-config
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    systemctl enable --now edgefleet-agent.service
    echo "provision: started edgefleet-agent.service; it enrolls with $controller (follow it with: journalctl -fu edgefleet-agent)"
else
    echo "provision: no systemd here; start the agent with: set -a; . $etc/agent.env; $agent --config $config run"
fi
