"""Drives the Bitrix24 simulator with fast_bitrix24, a widely used third-party Python client.

Run by the Rust test `official_client::fast_bitrix24_batches_and_rate_limit_handling_work_against_the_simulator`,
which starts the simulator with a full leaky bucket so the client's first request gets
503 QUERY_LIMIT_EXCEEDED and must back off and retry, exactly as against a real portal.
Prints one JSON line with what it observed; the Rust test asserts on it and on the portal state.
"""
import json
import sys

from fast_bitrix24 import Bitrix


def main() -> None:
    webhook = sys.argv[1]
    n = int(sys.argv[2])
    b = Bitrix(webhook, verbose=False)

    # `call` with a list sends the items through `batch`, 50 commands per request.
    items = [
        {"fields": {"TITLE": f"fb24 lead {i}", "PHONE": [{"VALUE": f"+38063{i:07d}", "VALUE_TYPE": "WORK"}]}}
        for i in range(n)
    ]
    ids = b.call("crm.lead.add", items)

    # `get_all` pages a list method: the first page directly, the rest inside batches.
    leads = b.get_all("crm.lead.list", {"select": ["ID", "TITLE"]})

    # A raw batch with a `$result[...]` reference between commands.
    raw = b.call_batch({"halt": 0, "cmd": {"me": "user.current", "same": "user.get?ID=$result[me][ID]"}})

    print(json.dumps({
        "added": len(ids),
        "unique_ids": len(set(int(i) for i in ids)),
        "listed": len([l for l in leads if l["TITLE"].startswith("fb24 lead")]),
        "me": raw["me"]["ID"],
        "same": raw["same"][0]["ID"],
    }))


if __name__ == "__main__":
    main()
