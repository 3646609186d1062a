# One image for every modelprint service; docker-compose.yml picks the process with `command:`
# (`modelprint serve gateway`, `modelprint worker inference`, ...). Health checks are per service
# in docker-compose.yml. No secrets are baked in: they come from the environment at run time.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MODELPRINT_DATA_DIR=/var/lib/modelprint

# The unprivileged user the services run as, and the data dir it may write (Celery beat's schedule).
# A named volume mounted on /var/lib/modelprint starts with this ownership.
RUN groupadd --system --gid 10001 modelprint \
    && useradd --system --uid 10001 --gid modelprint --create-home --home-dir /home/modelprint \
        --shell /usr/sbin/nologin modelprint \
    && mkdir -p /var/lib/modelprint \
    && chown modelprint:modelprint /var/lib/modelprint

WORKDIR /app

# Third-party dependencies first, in their own layer: it is rebuilt only when pyproject.toml changes.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# The project (setuptools reads README.md for the package metadata).
COPY README.md alembic.ini ./
COPY modelprint/ modelprint/
COPY services/ services/
COPY shared/ shared/
COPY migrations/ migrations/

# Editable install: the `modelprint` console script imports the packages from /app, so /app stays the
# only copy of the code and shared/migrate.py finds /app/alembic.ini and /app/migrations beside them.
# The last command fails the build if that ever stops being true.
RUN pip install --no-cache-dir -e . \
    && cd / \
    && python -c "from pathlib import Path; import shared.migrate as m; \
assert m.ALEMBIC_INI == Path('/app/alembic.ini') and m.ALEMBIC_INI.is_file(), m.ALEMBIC_INI; \
assert (m.MIGRATIONS_DIR / 'env.py').is_file() and (m.MIGRATIONS_DIR / 'versions').is_dir(), m.MIGRATIONS_DIR" \
    && modelprint --help > /dev/null

USER modelprint

EXPOSE 8000 8001

CMD ["modelprint", "--help"]
