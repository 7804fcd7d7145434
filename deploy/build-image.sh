#!/usr/bin/env bash
# Build the cdimover container image without any image registry, and print its reference.
#
#   deploy/build-image.sh [TAG]          # default TAG: localhost/cdimover:<version>
#
# 1. the cdimover wheel, built from this tree (or CDIMOVER_WHEEL=path/to.whl);
# 2. a root filesystem of Debian bookworm packages made by mmdebstrap (variant "extract":
#    python3 and the shared libraries the native core links, with their dependencies; no
#    Essential set, hence no shell, no perl, no compiler);
# 3. the wheel and its Python dependencies (wheels from PyPI, for the image's CPython 3.11)
#    installed into it with the host's pip, the standard library byte-compiled by the image's
#    own python, /etc/passwd with uid 107 (qemu), a CA bundle, docs and caches removed;
# 4. `podman import` of the tree: one layer, entrypoint `cdimover`, user 107:107; and for
#    CDI, REPO-importer, REPO-uploadserver and REPO-cloner (same tag): the same layer with
#    `cdimover pod import|upload-server|clone-source` as the entrypoint.
#
# Needs root (mmdebstrap writes a tree owned by root), mmdebstrap, podman, python3 with pip,
# and what building the wheel needs (README: "Set up"). DEBIAN_MIRROR overrides the mirror.
# The image reference is the last line of stdout; progress goes to stderr.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
python=${PYTHON:-python3}
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$repo/pyproject.toml")
tag=${1:-localhost/cdimover:$version}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
security=${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
py=3.11                                  # bookworm's CPython: the PyPI wheels are picked for it

# The runtime: python3 and what the native core links (libcurl4 brings its own TLS, HTTP/2
# and auth libraries); ca-certificates for HTTPS sources.
packages=python3,libcurl4,zlib1g,libzstd1,libdeflate0,libssl3,liblzma5,libffi8,ca-certificates

say() { echo "build-image: [${SECONDS}s] $*" >&2; }
[ "$(id -u)" = 0 ] || { say "needs root (mmdebstrap writes a root-owned tree)"; exit 1; }
for tool in mmdebstrap podman; do
    command -v "$tool" >/dev/null || { say "needs $tool (apt-get install $tool)"; exit 1; }
done

work=$(mktemp -d /var/tmp/cdimover-image.XXXXXX)
trap 'rm -rf "$work"' EXIT
root=$work/rootfs
site=$root/usr/local/lib/python$py/dist-packages

start=$SECONDS
if [ -n "${CDIMOVER_WHEEL:-}" ]; then
    wheel=$CDIMOVER_WHEEL
else
    say "building the wheel"
    "$python" -m pip wheel -qq --no-deps -w "$work/wheel" "$repo" >&2
    wheel=$(ls "$work"/wheel/cdimover-*.whl)
fi

say "root filesystem: $packages"
mmdebstrap --quiet --variant=extract --include="$packages" --skip=cleanup/apt/cache \
    bookworm "$root" "deb $mirror bookworm main" "deb $mirror bookworm-updates main" \
    "deb $security bookworm-security main" >&2

# The dpkg database of what was extracted (no maintainer script ran, so dpkg wrote none), for
# the scanners that list an image's packages by it.
for deb in "$root"/var/cache/apt/archives/*.deb; do
    dpkg-deb --field "$deb" | sed '/^Package:/a Status: install ok installed'
    echo
done > "$root/var/lib/dpkg/status"

say "installing $(basename "$wheel") and its dependencies"
# The host's pip picks wheels for its own interpreter and glibc: both must be the image's.
host_py=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
if [ "$host_py" != "$py" ]; then
    say "$python is $host_py, the image's python3 $py: set PYTHON"
    exit 1
fi
"$python" -m pip install -qq --disable-pip-version-check --root-user-action=ignore \
    --no-warn-script-location --target "$site" --only-binary=:all: "$wheel" >&2
rm -rf "$site/bin"                      # scripts with the host's interpreter in their #!
mkdir -p "$root/usr/local/bin"
cat > "$root/usr/local/bin/cdimover" <<'EOF'
#!/usr/bin/python3
import sys
from cdimover.cli import main
sys.exit(main())
EOF
chmod 0755 "$root/usr/local/bin/cdimover"

# Users: root and CDI's qemu (107:107); no login shell exists.
printf '%s\n' 'root:x:0:0:root:/root:/usr/sbin/nologin' \
    'qemu:x:107:107:qemu:/nonexistent:/usr/sbin/nologin' > "$root/etc/passwd"
printf 'root:x:0:\nqemu:x:107:\n' > "$root/etc/group"
# The CA bundle that update-ca-certificates would write (no maintainer script runs here).
mkdir -p "$root/etc/ssl/certs"
cat "$root"/usr/share/ca-certificates/mozilla/*.crt > "$root/etc/ssl/certs/ca-certificates.crt"
# What a program never reads at run time.
rm -rf "$root"/usr/share/{doc,man,info,locale,lintian,bug} "$root"/var/cache/apt/* \
    "$root"/var/lib/apt/lists/* "$root"/var/log/*
# Byte-compile with the image's own interpreter, so that a read-only container starts fast.
chroot "$root" /usr/bin/python3 -m compileall -q "/usr/lib/python$py" \
    "/usr/local/lib/python$py/dist-packages" >/dev/null
say "root filesystem $(du -sh "$root" | cut -f1)"

say "importing as $tag"
tar -C "$root" --numeric-owner -cf "$work/rootfs.tar" .
podman import -q \
    --change 'ENTRYPOINT ["/usr/local/bin/cdimover"]' \
    --change 'CMD ["--help"]' \
    --change 'USER 107:107' \
    --change 'WORKDIR /' \
    --change 'ENV PYTHONDONTWRITEBYTECODE=1' \
    --change 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
    --change 'LABEL org.opencontainers.image.title=cdimover' \
    --change "LABEL org.opencontainers.image.version=$version" \
    --change 'EXPOSE 8443' \
    "$work/rootfs.tar" "$tag" >/dev/null
# CDI starts its pods' images with nothing but `-v=N` as arguments: one image per role, the
# same layer, the role's pod command as the entrypoint (IMPORTER_IMAGE, UPLOADSERVER_IMAGE,
# CLONER_IMAGE of CDI's operator; README: "Under CDI").
case ${tag##*/} in
    *:*) name=${tag%:*} name_tag=${tag##*:} ;;
    *) name=$tag name_tag=latest ;;
esac
ctr=$(podman create -q "$tag")
trap 'podman rm -f "$ctr" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
for role in importer:import uploadserver:upload-server cloner:clone-source; do
    podman commit -q --change "ENTRYPOINT [\"/usr/local/bin/cdimover\", \"pod\", \"${role#*:}\"]" \
        --change 'CMD []' "$ctr" "$name-${role%%:*}:$name_tag" >/dev/null
    say "role image $name-${role%%:*}:$name_tag (cdimover pod ${role#*:})"
done
say "done in $((SECONDS - start)) s: $(podman image inspect --format '{{.Size}}' "$tag") bytes"
echo "$tag"
