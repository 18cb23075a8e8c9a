#!/usr/bin/env bash
# Prepare the federation and three agencies' data directories for deploy/compose.yaml.
#
#   deploy/prepare-compose.sh [DIR]        (default: deploy/data)
#
# Runs the same commands as docs/deploy.md, on one machine: the operator directory goes to
# DIR/operator (keep it; it holds the CA and registry keys), each agency's data directory to
# DIR/<agency>. Endpoints are the compose service names, so the issued certificates carry
# DNS SANs ecology, police and procuratorate. Needs `liandong` on PATH (or LIANDONG=...).
set -euo pipefail

dir=${1:-"$(dirname "$0")/data"}
liandong=${LIANDONG:-liandong}
port=7443
uid=10001 # the liandong user in deploy/Containerfile

declare -A names=(
  [ecology]="长治市生态环境局"
  [police]="长治市公安局"
  [procuratorate]="长治市人民检察院"
)

umask 077
mkdir -p "$dir"
"$liandong" federation init --dir "$dir/operator" --name changzhi-env

for kind in ecology police procuratorate; do
  data="$dir/$kind"
  "$liandong" init --agency "140400/$kind" --endpoint "$kind:$port" \
    --data-dir "$data" --name "${names[$kind]}"
  # Peers dial <service>:7443; inside the container the node binds every interface.
  sed -i "s/^listen = \"$kind:$port\"/listen = \"0.0.0.0:$port\"/" "$data/node.toml"
  grep -q "^listen = \"0.0.0.0:$port\"" "$data/node.toml"
  "$liandong" federation add-member "$data/request.json" --dir "$dir/operator"
done

"$liandong" federation publish --out "$dir/operator/registry.json" --dir "$dir/operator"

for kind in ecology police procuratorate; do
  data="$dir/$kind"
  install -m 0644 "$dir/operator/issued/140400-$kind.crt" "$data/tls.crt"
  install -m 0644 "$dir/operator/ca.crt" "$dir/operator/operator.pub" \
    "$dir/operator/registry.json" "$data/"
  chmod 0700 "$data" "$data/keys"
done

if [ "$(id -u)" = 0 ]; then
  chown -R "$uid:$uid" "$dir/ecology" "$dir/police" "$dir/procuratorate"
else
  echo "not root: run 'sudo chown -R $uid:$uid $dir/{ecology,police,procuratorate}'" \
    "so the container's liandong user owns the data directories" >&2
fi
echo "prepared $dir; now: docker compose -f deploy/compose.yaml up -d"
