#!/usr/bin/env bash
# Set up DKVM on a Debian 12 machine (as root) and boot a real VM with it:
# Debian packages, a Python venv for building and testing, dockerd, dist/dkvm.pyz
# built and installed as Docker's "dkvm" runtime, then `docker run --runtime=dkvm`
# on a busybox image built here (no registry needed). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")"

APT_PACKAGES=(docker.io runc containerd qemu-system-x86 qemu-system-common seabios
              busybox-static debootstrap python3 python3-venv python3-pip gcc libc6-dev
              ca-certificates procps podman
              golang-go make      # these two build the OCI validation suite the tests run
              containernetworking-plugins    # CNI (bridge, portmap) for the CRI tests' pods
              nftables)     # `nft`: a test reads back the rule a pod's port-forward makes
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
fi

if [ ! -x .venv/bin/python ]; then
  /usr/bin/python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements-dev.txt

if ! docker info >/dev/null 2>&1; then
  if [ -d /run/systemd/system ]; then
    systemctl start docker
  else
    echo "setup: starting dockerd (log: /var/log/dkvm-dockerd.log)"
    nohup dockerd >/var/log/dkvm-dockerd.log 2>&1 &
  fi
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  docker info >/dev/null
fi

.venv/bin/python build.py
/usr/bin/python3 dist/dkvm.pyz install

if ! docker image inspect dkvm-demo >/dev/null 2>&1; then
  tree=$(mktemp -d)
  mkdir -p "$tree/bin" "$tree/etc"
  cp /bin/busybox "$tree/bin/busybox"
  for applet in $(/bin/busybox --list); do
    [ "$applet" = busybox ] || ln -s busybox "$tree/bin/$applet"
  done
  echo "root:x:0:0:root:/root:/bin/sh" >"$tree/etc/passwd"
  echo "root:x:0:" >"$tree/etc/group"
  tar -C "$tree" -c . | docker import --change 'ENV PATH=/usr/sbin:/usr/bin:/sbin:/bin' - dkvm-demo >/dev/null
  rm -rf "$tree"
fi
echo "setup: host kernel $(uname -r); booting a VM:"
echo "+ docker run --rm --runtime=dkvm dkvm-demo uname -r"
docker run --rm --runtime=dkvm dkvm-demo uname -r
