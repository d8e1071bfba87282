#!/usr/bin/env bash
# Starts the sweep's MLflow tracking server (on the head node; in k8s/ as a Deployment; in the tests
# against the local emulation), with authentication on, and returns once it answers.
#
#   MLFLOW_HOME                   its folder: auth database, log, tracking_uri (default /home/ray/mlflow,
#                                 a host volume in cluster.yaml: it outlives the container)
#   MLFLOW_BACKEND_STORE_URI      runs and metrics (default sqlite:///$MLFLOW_HOME/mlflow.db; on AWS
#                                 better postgresql://user:password@your-rds-host:5432/mlflow)
#   MLFLOW_ARTIFACTS_DESTINATION  artifacts, proxied by the server (default $MLFLOW_HOME/artifacts;
#                                 on a cluster s3://your-bucket/mlflow-artifacts)
#   MLFLOW_HOST, MLFLOW_PORT      where it listens (default: this node's first address, 5000); with
#                                 0.0.0.0 (a container) clients reach it at this node's first address
#   MLFLOW_EXTRA_ALLOWED_HOSTS    more host:port names clients may use (a Kubernetes Service's names)
#   MLFLOW_AUTH_DATABASE_URI      the users and permissions (default sqlite:///$MLFLOW_HOME/basic_auth.db)
#   MLFLOW_AUTH_ADMIN_PASSWORD    the admin's password (default: made once, kept in $MLFLOW_HOME/admin_password)
#   MLFLOW_FLASK_SERVER_SECRET_KEY  the auth app's CSRF key (default: made once, kept in $MLFLOW_HOME/flask_secret)
#   MLFLOW_WORKERS                server processes (default 2: a sweep's driver is one client)
#   MLFLOW_FOREGROUND=1           run in the foreground (a container's main process) instead of detached
#
# It writes $MLFLOW_HOME/tracking_uri (the sweep's default --tracking-uri on this node) and
# ~/.mlflow/credentials (MLflow clients of this user log in with it).
set -euo pipefail
home=${MLFLOW_HOME:-/home/ray/mlflow}
port=${MLFLOW_PORT:-5000}
host=${MLFLOW_HOST:-$(hostname -I 2>/dev/null | awk '{print $1}')}
host=${host:-127.0.0.1}
mkdir -p "$home"  # (not chmod: it may be a volume's mount point; the secrets below are made 0600)
store=${MLFLOW_BACKEND_STORE_URI:-sqlite:///$home/mlflow.db}
artifacts=${MLFLOW_ARTIFACTS_DESTINATION:-$home/artifacts}

if [[ -z ${MLFLOW_AUTH_ADMIN_PASSWORD:-} ]]; then
  if [[ ! -s $home/admin_password ]]; then
    (umask 077; python -c 'import secrets; print(secrets.token_urlsafe(24))' > "$home/admin_password")
  fi
  MLFLOW_AUTH_ADMIN_PASSWORD=$(cat "$home/admin_password")
fi
export MLFLOW_AUTH_ADMIN_PASSWORD
if [[ -z ${MLFLOW_FLASK_SERVER_SECRET_KEY:-} ]]; then  # the auth app's CSRF key: the same across restarts
  if [[ ! -s $home/flask_secret ]]; then
    (umask 077; python -c 'import secrets; print(secrets.token_hex(32))' > "$home/flask_secret")
  fi
  MLFLOW_FLASK_SERVER_SECRET_KEY=$(cat "$home/flask_secret")
fi
export MLFLOW_FLASK_SERVER_SECRET_KEY
cat > "$home/basic_auth.ini" <<INI
[mlflow]
default_permission = READ
database_uri = ${MLFLOW_AUTH_DATABASE_URI:-sqlite:///$home/basic_auth.db}
admin_username = admin
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
INI
export MLFLOW_AUTH_CONFIG_PATH=$home/basic_auth.ini
mkdir -p ~/.mlflow
(umask 077; printf '[mlflow]\nmlflow_tracking_username = admin\nmlflow_tracking_password = %s\n' \
  "$MLFLOW_AUTH_ADMIN_PASSWORD" > ~/.mlflow/credentials)

advertised=$host
if [[ $host == 0.0.0.0 ]]; then
  advertised=$(hostname -I 2>/dev/null | awk '{print $1}')
  advertised=${advertised:-127.0.0.1}
fi
uri="http://$advertised:$port"
# MLflow 3's job runner serves GenAI features a sweep does not use: 8 processes fewer.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}
command=(mlflow server --app-name basic-auth --host "$host" --port "$port" --workers "${MLFLOW_WORKERS:-2}"
         --backend-store-uri "$store" --artifacts-destination "$artifacts"
         --allowed-hosts "$advertised:$port,localhost:*,127.0.0.1:*${MLFLOW_EXTRA_ALLOWED_HOSTS:+,$MLFLOW_EXTRA_ALLOWED_HOSTS}")
echo "$uri" > "$home/tracking_uri"
if [[ ${MLFLOW_FOREGROUND:-0} == 1 ]]; then
  exec "${command[@]}"
fi
setsid nohup "${command[@]}" >> "$home/server.log" 2>&1 < /dev/null &
pid=$!
echo $pid > "$home/server.pid"
for _ in $(seq 1 120); do
  if ! kill -0 "$pid" 2>/dev/null; then
    echo "mlflow server exited at start; its log ($home/server.log) ends with:" >&2
    tail -n 20 "$home/server.log" >&2
    exit 1
  fi
  if python -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + '/health', timeout=2)" "http://127.0.0.1:$port" 2>/dev/null \
     || python -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + '/health', timeout=2)" "$uri" 2>/dev/null; then
    echo "mlflow server at $uri (store $store, artifacts $artifacts, log $home/server.log)"
    exit 0
  fi
  sleep 1
done
echo "mlflow server did not answer at $uri within 120 s; its log: $home/server.log" >&2
tail -n 20 "$home/server.log" >&2
exit 1
