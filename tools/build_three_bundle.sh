#!/usr/bin/env bash
# Rebuild src/qctfea/qc/assets/qctfea-three.min.js: the parts of three.js the per-patient page
# (qctfea.qc.patient_page) uses, bundled by esbuild into one minified IIFE that sets the global
# `QCTFEA_THREE`. Run by hand when upgrading three.js (needs node/npm and the npm registry);
# the page itself never downloads anything: the bundle is inlined into each page.
set -euo pipefail
if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
  sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0
fi
THREE_VERSION=${THREE_VERSION:-0.187.0}
ESBUILD_VERSION=${ESBUILD_VERSION:-0.28.2}
repo=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
npm init -y >/dev/null
npm install --no-audit --no-fund "three@$THREE_VERSION" "esbuild@$ESBUILD_VERSION" >/dev/null
cat > entry.js <<'JS'
export {
  AmbientLight, Box3, BufferAttribute, BufferGeometry, Color, DirectionalLight, DoubleSide,
  Group, Mesh, MeshPhongMaterial, PerspectiveCamera, Points, PointsMaterial, Scene, Vector3,
  WebGLRenderer,
} from "three";
export { OrbitControls } from "three/examples/jsm/controls/OrbitControls.js";
JS
npx esbuild entry.js --bundle --minify --format=iife --global-name=QCTFEA_THREE \
  --legal-comments=inline --target=es2020 --outfile="$repo/src/qctfea/qc/assets/qctfea-three.min.js"
cp node_modules/three/LICENSE "$repo/src/qctfea/qc/assets/LICENSE-three.txt"
echo "three@$THREE_VERSION bundled by esbuild@$ESBUILD_VERSION"
