#!/usr/bin/env bash
# Ray for the device machine (its Python 3.12), into .ray/ (ignored by git): Ray's wheel (79 MB) is over what one
# device call carries (64 MiB), so it travels in two chunk folders, .ray/c1 (half of the wheel) and .ray/c2 (the
# other half, Ray's dependencies at the versions constraints.txt pins, and install.sh). Needs the package registry
# (run it here, on the CPU machine). On the device, bring c1 and c2 in two back-to-back calls, copying each out of
# the working copy in the call that brings it (`carry: [".ray/c1"]`, then `mkdir -p /tmp/raych && cp -r .ray/c1
# /tmp/raych/`; the same for c2), then `bash /tmp/raych/c2/install.sh /tmp/raych` installs into /tmp/site beside
# the wheels of benchmarks/device_run.sh.   Usage: bash scripts/device_ray.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
plat="--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64"
for p in 17 24 27; do plat="$plat --platform manylinux_2_${p}_x86_64"; done
plat="$plat --platform manylinux2014_x86_64"
rm -rf .ray && mkdir -p .ray/dl .ray/c1 .ray/c2
python3 -m pip download -q -c constraints.txt $plat -d .ray/dl ray
wheel=$(basename .ray/dl/ray-*.whl)
split -n 2 -d ".ray/dl/$wheel" ".ray/dl/$wheel.part" && rm ".ray/dl/$wheel"
mv ".ray/dl/$wheel.part00" .ray/c1/
mv ".ray/dl/$wheel.part01" .ray/c2/
mv .ray/dl/*.whl .ray/c2/
rm -r .ray/dl
cat > .ray/c2/install.sh <<INSTALL
#!/usr/bin/env bash
# Join Ray's wheel from the two chunk folders under \$1 and install it with its dependencies into /tmp/site.
set -euo pipefail
cat "\$1"/c1/$wheel.part00 "\$1"/c2/$wheel.part01 > /tmp/$wheel
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site /tmp/$wheel "\$1"/c2/*.whl
INSTALL
du -sh .ray/c1 .ray/c2
