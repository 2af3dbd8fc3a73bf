#!/bin/sh
# One-shot MinIO bootstrap, run by the `minio-init` container (minio/mc image) from compose.yaml.
# Idempotent: safe to run again on an existing data volume.
#
# The only place that uses the MinIO root credentials. It creates the three buckets and one user
# per service, each bound to its least-privilege policy from deploy/minio/policies/.
#
# Environment:
#   MINIO_ENDPOINT                                    default http://minio:9000
#   MINIO_ROOT_USER, MINIO_ROOT_PASSWORD              root credentials (required)
#   POLICY_DIR                                        default /policies
#   <SVC>_S3_ACCESS_KEY, <SVC>_S3_SECRET_KEY          per service; SVC = VALIDATOR, TRAINER,
#                                                     EVALUATOR, REGISTRY (required)
set -eu

MINIO_ENDPOINT="${MINIO_ENDPOINT:-http://minio:9000}"
POLICY_DIR="${POLICY_DIR:-/policies}"
ALIAS=tunebus

# Bucket names: the S3Settings defaults in shared/settings.py; the policies name them literally.
DATASETS_BUCKET=tunebus-datasets
MODELS_BUCKET=tunebus-models
ADAPTERS_BUCKET=tunebus-adapters

: "${MINIO_ROOT_USER:?MINIO_ROOT_USER is required}"
: "${MINIO_ROOT_PASSWORD:?MINIO_ROOT_PASSWORD is required}"

echo "waiting for MinIO at ${MINIO_ENDPOINT}"
tries=0
until mc alias set "$ALIAS" "$MINIO_ENDPOINT" "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD" >/dev/null 2>&1 \
    && mc ready "$ALIAS" >/dev/null 2>&1; do
    tries=$((tries + 1))
    if [ "$tries" -ge 60 ]; then
        echo "MinIO at ${MINIO_ENDPOINT} is not ready after 60 tries" >&2
        exit 1
    fi
    sleep 2
done

for bucket in "$DATASETS_BUCKET" "$MODELS_BUCKET" "$ADAPTERS_BUCKET"; do
    mc mb --ignore-existing "$ALIAS/$bucket"
done

# provision USER SECRET POLICY_NAME POLICY_FILE: create (or update) the user, (re)load the policy,
# attach it. Plain POSIX sh and mc only: minimal mc images need not ship grep, sed or awk.
provision() {
    user="$1"
    secret="$2"
    policy="$3"
    policy_file="$4"

    if [ "$user" = "$MINIO_ROOT_USER" ]; then
        echo "refusing to give a service the root user ($user)" >&2
        exit 1
    fi
    mc admin user add "$ALIAS" "$user" "$secret" >/dev/null
    mc admin policy create "$ALIAS" "$policy" "$policy_file" >/dev/null
    # Attaching a policy that is already attached is an error for MinIO; it is not one for us.
    if ! mc admin policy attach "$ALIAS" "$policy" --user "$user" >/dev/null 2>&1; then
        case "$(mc admin user info "$ALIAS" "$user" 2>&1)" in
            *"$policy"*) ;;
            *)
                echo "could not attach policy $policy to $user" >&2
                exit 1
                ;;
        esac
    fi
    echo "user $user -> policy $policy"
}

provision "${VALIDATOR_S3_ACCESS_KEY:?}" "${VALIDATOR_S3_SECRET_KEY:?}" \
    tunebus-dataset-validator "$POLICY_DIR/dataset_validator.json"
provision "${TRAINER_S3_ACCESS_KEY:?}" "${TRAINER_S3_SECRET_KEY:?}" \
    tunebus-trainer "$POLICY_DIR/trainer.json"
provision "${EVALUATOR_S3_ACCESS_KEY:?}" "${EVALUATOR_S3_SECRET_KEY:?}" \
    tunebus-evaluator "$POLICY_DIR/evaluator.json"
provision "${REGISTRY_S3_ACCESS_KEY:?}" "${REGISTRY_S3_SECRET_KEY:?}" \
    tunebus-adapter-registry "$POLICY_DIR/adapter_registry.json"

echo "MinIO is ready for tunebus"
