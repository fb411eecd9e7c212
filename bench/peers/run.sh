#!/usr/bin/env bash
# plugd beside the systems a user would otherwise pick, in one session, as ratios to the raw
# socketpair floor measured in that same session: bench/peers/run.sh [SAMPLES] (default 100000).
#
# Not part of CI: it installs Debian's Go toolchain and go-plugin set (offline-buildable in
# GOPATH mode) when they are missing, and builds the Rust peers (ipc-channel, tokio+bincode),
# which are kept out of the plugd workspace. Prints a Markdown table for bench/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")"
here=$(pwd)
root=$(cd ../.. && pwd)
n=${1:-100000}

need=(golang-go golang-github-hashicorp-go-plugin-dev golang-google-grpc-dev
      golang-github-golang-protobuf-1-5-dev golang-google-protobuf-dev golang-golang-x-net-dev
      protobuf-compiler protoc-gen-go protoc-gen-go-grpc)
missing=()
for p in "${need[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing ${missing[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

echo "building plugd, the Rust peers and the Go peers" >&2
(cd "$root" && cargo build -q --release --workspace)
cargo build -q --release --manifest-path rust/Cargo.toml
gopath=$(mktemp -d)
trap 'rm -rf "$gopath"' EXIT
cp -r go/src "$gopath/"
(cd "$gopath/src" && protoc -I . --go_out=. --go_opt=paths=source_relative \
  --go-grpc_out=. --go-grpc_opt=paths=source_relative plugdpeer/tickpb/tick.proto)
for b in host plugin; do
  GOPATH="$gopath:/usr/share/gocode" GO111MODULE=off go build -o "$gopath/$b" "plugdpeer/$b"
done

run_all() {
  local pin=("$@")
  "${pin[@]}" "$root/target/release/plugd-bench" --peers-mode "$n"
  "${pin[@]}" "$here/rust/target/release/tokio_bincode" "$n"
  "${pin[@]}" "$here/rust/target/release/ipc_channel" "$n"
  "${pin[@]}" "$here/rust/target/release/iceoryx2_rr" "$n"
  "${pin[@]}" python3 "$here/python_pipe.py" "$n"
  "${pin[@]}" "$gopath/host" netrpc "$n" "$gopath/plugin"
  "${pin[@]}" "$gopath/host" grpc "$n" "$gopath/plugin"
}

table() {
  # RESULT name p50 p99 p999 samples -> Markdown rows with ratios to the raw floor's p50 / p99.9.
  awk '/^RESULT/ {
         name[++k] = $2; p50[k] = $3; p99[k] = $4; p999[k] = $5
         if ($2 == "raw-socketpair-64B") { f50 = $3; f999 = $5 }
       }
       END {
         print "| | p50 µs | p99 µs | p99.9 µs | × floor p50 / p99.9 |"
         print "|---|---|---|---|---|"
         for (i = 1; i <= k; i++)
           printf "| %s | %.1f | %.1f | %.1f | %.2f / %.2f |\n", name[i], p50[i], p99[i], p999[i], p50[i] / f50, p999[i] / f999
       }'
}

echo "### Unpinned ($n round trips each, 64-byte class messages, one in flight)"
run_all env | table
echo
echo "### Pinned: each system's processes and threads all on CPU 0 (taskset -c 0)"
run_all taskset -c 0 | table
