# Sourced by the bench/device scripts on the GPU machine: installs the carried wheels (.whl) and
# unpacks Debian's runc and etcd (.deb), then exports SITE, OUT, PYTHONPATH and PATH.
SITE=/opt/snapwake-site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $SITE .whl/*.whl || exit 1
mkdir -p /opt/debs && for f in .deb/*.deb; do dpkg -x "$f" /opt/debs; done
export SITE PYTHONPATH=$SITE:$PWD PYTHONUNBUFFERED=1 PATH=/opt/debs/usr/sbin:/opt/debs/usr/bin:$PATH
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; export OUT
# skopeo is Debian's: its libraries (gpgme, devmapper) come from .deb too, for it alone.
mkdir -p /opt/debs/wrap
printf '#!/bin/sh\nLD_LIBRARY_PATH=/opt/debs/usr/lib/x86_64-linux-gnu:/opt/debs/lib/x86_64-linux-gnu exec /opt/debs/usr/bin/skopeo "$@"\n' >/opt/debs/wrap/skopeo
chmod +x /opt/debs/wrap/skopeo; export PATH=/opt/debs/wrap:$PATH
# The node's image tools run with a fixed PATH of their own (services/nodeagent/images/tools.py).
ln -sf /opt/debs/wrap/skopeo /usr/local/bin/skopeo; ln -sf /opt/debs/usr/bin/umoci /usr/local/bin/umoci
ldconfig -p | grep -q libseccomp.so.2 || export LD_LIBRARY_PATH=/opt/debs/usr/lib/x86_64-linux-gnu
