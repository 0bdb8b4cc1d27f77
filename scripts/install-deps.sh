#!/usr/bin/env bash
# Installs what Streamer's demo, tests and benchmarks need on a Debian
# machine, when it is missing: containerd, runc, FUSE 3, the distribution
# registry, skopeo, a static busybox (test images), htpasswd and iproute2.
# With --bench, only what the readiness benchmark adds (debootstrap).
# Idempotent; prints nothing when all is present.
set -euo pipefail

have() { command -v "$1" >/dev/null 2>&1; }

# apt_install installs Debian packages as root, retrying apt's network.
apt_install() {
	if [ "$(id -u)" != 0 ]; then
		echo "install-deps: missing $*; run as root or install them" >&2
		exit 1
	fi
	echo "install-deps: installing $*" >&2
	export DEBIAN_FRONTEND=noninteractive
	for try in 1 2 3; do
		if apt-get update -qq && apt-get install -y -qq --no-install-recommends "$@" >/dev/null; then
			return 0
		fi
		[ "$try" = 3 ] && { echo "install-deps: apt-get failed" >&2; exit 1; }
		sleep $((try * 5))
	done
}

# bench_deps: what only the readiness benchmark needs (make bench-readiness,
# make bench): debootstrap, to build its Debian images.
bench_deps() {
	have debootstrap || apt_install debootstrap
}

if [ "${1:-}" = "--bench" ]; then
	bench_deps
	exit 0
fi

need=()
have containerd || need+=(containerd)
have runc || need+=(runc)
have fusermount3 || need+=(fuse3)
have docker-registry || need+=(docker-registry)
have skopeo || need+=(skopeo)
[ -x /bin/busybox ] || need+=(busybox-static)
have htpasswd || need+=(apache2-utils)
have ip || need+=(iproute2)
have tc || need+=(iproute2)

if [ ${#need[@]} -gt 0 ]; then
	apt_install "${need[@]}"
fi
# The distribution registry's Debian unit may start one on :5000; the tests
# start their own on random ports and need nothing else.
if [ ! -e /dev/fuse ]; then
	mknod -m 0666 /dev/fuse c 10 229 2>/dev/null || echo "install-deps: /dev/fuse is missing" >&2
fi
