# synctoken's image: a Debian bookworm base with its python3, and in it one venv holding exactly
# what uv.lock says for the service (wheels checked against the lock's hashes), nothing else.
#
# `make image` prepares the build context (build/image: the wheels, the requirements with their
# hashes, uv) and the base (a root file system made with debootstrap and imported as
# localhost/synctoken-base:bookworm), then builds this with podman. The build needs no network.
ARG BASE=localhost/synctoken-base:bookworm

FROM ${BASE} AS build
# uv (pinned by hash in tools/uv.txt) makes the venv and installs into it: no pip, no compiler.
COPY uv /usr/local/bin/uv
COPY wheels/ /wheels/
# --require-hashes: every third-party wheel must be the one the lock names. The two project wheels
# (the service and its API stubs) were built from this tree, so they are installed without deps.
# Bytecode is compiled now: the root file system is read-only at run time.
RUN uv venv --python /usr/bin/python3 /opt/synctoken \
    && uv pip install --python /opt/synctoken/bin/python --offline --no-index --find-links /wheels \
        --require-hashes --compile-bytecode -r /wheels/requirements.txt \
    && uv pip install --python /opt/synctoken/bin/python --offline --no-index --no-deps --compile-bytecode \
        /wheels/synctoken_api-*.whl /wheels/synctoken-*.whl

FROM ${BASE}
COPY --from=build /opt/synctoken /opt/synctoken
ENV PATH=/opt/synctoken/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONDONTWRITEBYTECODE=1 \
    MALLOC_ARENA_MAX=1
# A numeric user, so that runAsNonRoot can check it without a passwd entry; no home, nothing to write:
# the root file system may be read-only (the config, certificates and secrets are mounted).
USER 65532:65532
WORKDIR /
# 50051: mTLS (server.listen); 8081: plaintext health for probes ([health]); 9464: metrics ([metrics]).
EXPOSE 50051 8081 9464
# SIGTERM drains: NOT_SERVING at once, served on for drain_delay, then grace for calls in flight.
STOPSIGNAL SIGTERM
ENTRYPOINT ["synctoken"]
CMD ["serve", "--config", "/etc/synctoken/config/synctoken.toml"]
