#!/bin/sh
# The blog's image leaves the store and comes back: saved to an archive (its inside read by hand:
# manifest, config, a layer tar whose sha256 is its DiffID), pushed to a real local registry (the
# blob there is the gzip of that tar: another digest), pulled into an empty store, and run.
. "$(dirname "$0")/../lib.sh"
mkdir -p "$D/ctx" "$D/archive"
printf '#!/bin/sh\necho "hello, layers!!"\n' > "$D/ctx/app.sh"
printf 'FROM alpine\nCOPY app.sh ./app.sh\nRUN chmod +x app.sh\nENTRYPOINT ["./app.sh"]\n' > "$D/ctx/Dockerfile"
$PYLAYERFS base alpine >/dev/null
$PYLAYERFS build -t bitphile/my-new-image "$D/ctx" >/dev/null

pl save -o "$D/my-new-image.tar" bitphile/my-new-image
run tar -tf "$D/my-new-image.tar"
tar -xf "$D/my-new-image.tar" -C "$D/archive"
say "cat manifest.json"
python3 -m json.tool "$D/archive/manifest.json"
config=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))[0]["Config"])' "$D/archive/manifest.json")
say "the config's rootfs (its sha256 is the image ID: $(sha256sum "$D/archive/$config" | cut -c1-12))"
python3 -c 'import json,sys; print(json.dumps(json.load(open(sys.argv[1]))["rootfs"], indent=2))' "$D/archive/$config"
top=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))[0]["Layers"][-1])' "$D/archive/manifest.json")
say "tar -tvf $top   # the top layer: the chmod's copy-up"
tar -tvf "$D/archive/$top"
run sha256sum "$D/archive/$top"

# A real registry on this machine: Debian's docker-registry, storage in the demo's directory.
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
cat > "$D/registry.yml" <<YML
version: 0.1
log: {level: warn, accesslog: {disabled: true}}
storage: {filesystem: {rootdirectory: $D/registry}}
http: {addr: 127.0.0.1:$port}
YML
docker-registry serve "$D/registry.yml" >"$D/registry.log" 2>&1 &
registry=$!
trap 'kill $registry 2>/dev/null; cleanup' EXIT
until python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/v2/')" 2>/dev/null; do sleep 0.1; done

pl tag bitphile/my-new-image "127.0.0.1:$port/bitphile/my-new-image"
pl push "127.0.0.1:$port/bitphile/my-new-image"
blobs="$D/registry/docker/registry/v2/blobs/sha256"
say "the registry's blobs (bytes, digest): the config, the manifest, the three layers gzip-compressed"
for f in "$blobs"/*/*/data; do printf '%8s  sha256:%s\n' "$(stat -c %s "$f")" "$(basename "$(dirname "$f")")"; done
say "the top layer's blob, unzipped: sha256sum is its DiffID again"
for f in "$blobs"/*/*/data; do
    if gzip -t "$f" 2>/dev/null && [ "$(gzip -dc "$f" | sha256sum | cut -d' ' -f1)" = "$(basename "$top")" ]; then
        echo "blob   sha256:$(basename "$(dirname "$f")")"
        echo "DiffID sha256:$(gzip -dc "$f" | sha256sum | cut -d' ' -f1)"
    fi
done

export PYLAYERFS_ROOT="$D/empty-store"
pl pull "127.0.0.1:$port/bitphile/my-new-image"
pl images --digests
pl history "127.0.0.1:$port/bitphile/my-new-image"
pl run --rm "127.0.0.1:$port/bitphile/my-new-image"
