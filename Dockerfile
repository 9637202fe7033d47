# The distributex lock server as a small image: python:3.11-slim, the package and
# its backends' libraries installed from wheels built in a first stage, run as an
# unprivileged user, with a health check on GET /healthz.
#   docker build -t distributex .
#   docker run -d -p 9889:9889 -v distributex-state:/var/lib/distributex distributex
#   docker kill -s HUP <container>     # reread the configuration
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip wheel --no-cache-dir --wheel-dir /wheels '.[all]'

FROM python:3.11-slim
RUN useradd --system --uid 10001 --user-group --no-create-home distributex \
    && install -d -o distributex -g distributex -m 0700 /var/lib/distributex
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links /wheels 'distributex[all]' \
    && rm -rf /wheels
COPY packaging/docker/distributex.yaml /etc/distributex/distributex.yaml
USER distributex
VOLUME ["/var/lib/distributex"]
EXPOSE 9889
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=6s --start-period=5s --retries=3 \
    CMD ["python", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:9889/healthz', timeout=5)"]
ENTRYPOINT ["distributexd"]
CMD ["-c", "/etc/distributex/distributex.yaml", "--log-format", "json"]
