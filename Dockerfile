# The dbops worker image for the Docker and Kubernetes work pools (prefect.docker.yaml, prefect.k8s.yaml):
# the repository, its locked dependencies, and PostgreSQL's tools of the server's major version.
#
#   docker build -t dbops-worker:pg15 .                         # PostgreSQL 15 servers
#   docker build --build-arg PG_MAJOR=16 -t dbops-worker:pg16 .  # a PostgreSQL 16 server
#
# Flow runs start in it as `prefect flow-run execute`; the deployments' pull step sets the working
# directory to WORKDIR below, so the entrypoints (flows/...) are found in the image, not fetched.
FROM python:3.11-slim-bookworm

# The major version of the PostgreSQL server dbops backs up. pg_dump, pg_basebackup and pg_verifybackup
# must not be older than the server, and dbops uses the server's own major when it is installed
# (flows/core/pgtools.py find_tool), so build one image per server major.
ARG PG_MAJOR=15
ARG UV_VERSION=0.13.8

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false

# PostgreSQL from the PGDG repository (every supported major for bookworm), set up by Debian's own
# postgresql-common script with the signing key that package ships. postgresql-${PG_MAJOR} is the server
# package: it carries pg_archivecleanup (WAL expiry of a directory archive) and pg_ctl/postgres (the PITR
# restore and drill start the recovered copy on the worker); it depends on postgresql-client-${PG_MAJOR}
# (pg_dump, pg_restore, pg_dumpall, psql, pg_amcheck, pg_basebackup, pg_verifybackup). No cluster is
# created in the image: PGDG's postgresql-common is installed before createcluster.conf is edited, so the
# server package's install does not replace the edit. zstd is the CLI for restoring by hand.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates postgresql-common \
 && /usr/share/postgresql-common/pgdg/apt.postgresql.org.sh -y \
 && apt-get install -y --no-install-recommends postgresql-common \
 && sed -ri 's/^#?\s*create_main_cluster\s*=.*/create_main_cluster = false/' \
        /etc/postgresql-common/createcluster.conf \
 && apt-get install -y --no-install-recommends \
        postgresql-${PG_MAJOR} postgresql-client-${PG_MAJOR} zstd \
 && rm -rf /var/lib/apt/lists/* \
 && for tool in pg_dump pg_restore pg_dumpall psql pg_amcheck pg_basebackup pg_verifybackup \
                pg_archivecleanup pg_ctl; do \
        /usr/lib/postgresql/${PG_MAJOR}/bin/${tool} --version || exit 1; \
    done \
 && zstd --version

ENV PATH=/opt/dbops/.venv/bin:/usr/lib/postgresql/${PG_MAJOR}/bin:${PATH} \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never

RUN pip install --no-cache-dir "uv==${UV_VERSION}"

WORKDIR /opt/dbops

# Dependencies first (a layer that changes only with uv.lock), then the project itself. --frozen: exactly
# uv.lock, never re-resolved; --no-dev: no test tools in the image.
COPY pyproject.toml uv.lock ./
RUN uv sync --frozen --no-dev --no-install-project
COPY . .
RUN uv sync --frozen --no-dev \
 && python -c "import flows.nightly_dump, flows.base_backup, flows.pitr_restore, prefect_aws"

# Not root: PostgreSQL's server refuses to run as root (the PITR flows start one), and nothing here needs
# it. A numeric uid so Kubernetes' runAsNonRoot can check it. /var/lib/dbops holds PITR data directories.
RUN groupadd --system --gid 10001 dbops \
 && useradd --system --uid 10001 --gid dbops --create-home --home-dir /home/dbops dbops \
 && install -d -o dbops -g dbops /var/lib/dbops /var/lib/dbops/pitr
ENV HOME=/home/dbops \
    PREFECT_HOME=/home/dbops/.prefect
USER 10001
