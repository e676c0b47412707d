#!/usr/bin/env bash
# Apply edited model settings (config.pbtxt in a kustomization) and reload the model in
# place: sessions carry over to the new model instance through the handoff directory.
#   deploy/reload-model.sh deploy/k8s/base        (or deploy/k8s/overlays/gpu)
# Env: NAMESPACE (default: the context's), TIMEOUT_S (default 180, ConfigMap sync wait).
set -euo pipefail
dir=${1:?usage: reload-model.sh KUSTOMIZATION_DIR}
ns=(${NAMESPACE:+--namespace "$NAMESPACE"})
kubectl "${ns[@]}" apply -k "$dir"
want=$(kubectl "${ns[@]}" get configmap sinkserve-model -o jsonpath='{.data.config\.pbtxt}')
# The kubelet refreshes a mounted ConfigMap within about a minute; wait until Triton's
# repository shows the new file before asking for the reload.
deadline=$((SECONDS + ${TIMEOUT_S:-180}))
until [ "$(kubectl "${ns[@]}" exec deploy/sinkserve -c triton -- cat /models/sinkserve/config.pbtxt)" = "$want" ]; do
  if ((SECONDS > deadline)); then echo "config.pbtxt not updated in the pod yet" >&2; exit 1; fi
  sleep 5
done
# RepositoryModelLoad: Triton starts a new instance, routes new requests to it, and
# finalizes the old one when its turns are done; the old one hands its sessions over.
# A bad setting fails the load with an error naming the key.
kubectl "${ns[@]}" exec deploy/sinkserve -c triton -- python3 -c '
import tritonclient.http as http
http.InferenceServerClient("127.0.0.1:8000", network_timeout=900.0).load_model("sinkserve")
print("model sinkserve reloaded")'
