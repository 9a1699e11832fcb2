# Sourced by the bench/device scripts on the GPU machine: installs the carried wheels (.whl) and
# unpacks Debian's runc and etcd (.deb), then exports SITE, OUT, PYTHONPATH and PATH.
SITE=/opt/snapwake-site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $SITE .whl/*.whl || exit 1
mkdir -p /opt/debs && for f in .deb/*.deb; do dpkg -x "$f" /opt/debs; done
export SITE PYTHONPATH=$SITE:$PWD PYTHONUNBUFFERED=1 PATH=/opt/debs/usr/sbin:/opt/debs/usr/bin:$PATH
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; export OUT
