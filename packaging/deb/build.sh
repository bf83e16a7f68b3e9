#!/usr/bin/env bash
# Builds the Debian package: target/debian/ubsync_<version>-1_<arch>.deb.
#   bash packaging/deb/build.sh            # version from Cargo.toml
#   VERSION=0.1.1 bash packaging/deb/build.sh
# Needs cargo-deb (`cargo install cargo-deb`). The units ship with ExecStart=/usr/bin/ubsync
# (the repository's units name /usr/local/bin/ubsync, where a manual install puts it).
set -euo pipefail
cd "$(dirname "$0")/../.."
command -v cargo-deb >/dev/null || { echo "packaging/deb/build.sh: needs cargo-deb: cargo install cargo-deb" >&2; exit 2; }
cargo build --release
# (Under the checkout's target/ whatever CARGO_TARGET_DIR says: cargo-deb maps only
# target/release/ to the real target directory.)
stage=target/deb-stage/units
rm -rf target/deb-stage && mkdir -p "$stage"
for f in systemd/*.service systemd/*.timer; do
    sed -e 's|/usr/local/bin/ubsync|/usr/bin/ubsync|g' \
        -e 's|file:/usr/local/share/doc/ubsync|file:/usr/share/doc/ubsync|' "$f" >"$stage/$(basename "$f")"
done
cargo deb --no-build ${VERSION:+--deb-version "$VERSION"}
