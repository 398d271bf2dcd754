"""The jobs table's shape: the one source for the code, the sandbox and the CloudFormation check."""

# `pk` is the record key, "<job key>/<owner digest>" (jobs.record_key): the owner is part of it, so one
# caller's job key never names, blocks or reveals another's. Records also carry `job_key` and `owner`.
TABLE_KEY = "pk"
LIVE_INDEX = "live-index"
TASK_INDEX = "task-index"
# GET /jobs: a caller's jobs, newest first. `owner_key` is the owner digest (the record key's suffix,
# `jobs.owner_digest`), written by `JobStore.create`; records written before it existed are not listed.
OWNER_INDEX = "owner-index"
OWNER_KEY = "owner_key"
POOL_INDEX = "pool-index"
TTL_ATTRIBUTE = "expires_at"
# Per-job task definitions have records of their own, `taskdef/<family>`, in the live index under this value
# of `live` (jobs use "1"), with `deadline` the time they fall unused.
TASK_DEFINITION_LIVE = "taskdef"
TASK_DEFINITION_KEY = "taskdef/{family}"

TABLE_SCHEMA: dict = {
    "KeySchema": [{"AttributeName": TABLE_KEY, "KeyType": "HASH"}],
    "AttributeDefinitions": [
        {"AttributeName": TABLE_KEY, "AttributeType": "S"},
        {"AttributeName": "live", "AttributeType": "S"},
        {"AttributeName": "deadline", "AttributeType": "N"},
        {"AttributeName": "task_arn", "AttributeType": "S"},
        {"AttributeName": OWNER_KEY, "AttributeType": "S"},
        {"AttributeName": "created_at", "AttributeType": "S"},
        {"AttributeName": "pool", "AttributeType": "S"},
    ],
    "GlobalSecondaryIndexes": [
        {
            # Sparse: only jobs that are not terminal carry `live`, so the reaper reads just those.
            "IndexName": LIVE_INDEX,
            "KeySchema": [
                {"AttributeName": "live", "KeyType": "HASH"},
                {"AttributeName": "deadline", "KeyType": "RANGE"},
            ],
            "Projection": {"ProjectionType": "ALL"},
        },
        {
            "IndexName": TASK_INDEX,
            "KeySchema": [{"AttributeName": "task_arn", "KeyType": "HASH"}],
            "Projection": {"ProjectionType": "ALL"},
        },
        {
            # created_at is ISO 8601 UTC with milliseconds, so string order is time order.
            "IndexName": OWNER_INDEX,
            "KeySchema": [
                {"AttributeName": OWNER_KEY, "KeyType": "HASH"},
                {"AttributeName": "created_at", "KeyType": "RANGE"},
            ],
            "Projection": {"ProjectionType": "ALL"},
        },
        {
            # Sparse: only warm pool tasks that are "warming" (started) or "idle" (claimable) carry `pool`.
            "IndexName": POOL_INDEX,
            "KeySchema": [{"AttributeName": "pool", "KeyType": "HASH"}],
            "Projection": {"ProjectionType": "ALL"},
        },
    ],
    "BillingMode": "PAY_PER_REQUEST",
}
