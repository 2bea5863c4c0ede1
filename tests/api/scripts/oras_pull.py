"""ORAS (the Python `oras` package) pulls through a gateway: an artifact by tag, then the
referrers of a subject listed through its own HTTP session, and each referrer by digest.

Usage: oras_pull.py HOST REPOSITORY TAG SUBJECT_DIGEST OUTDIR
Prints one JSON object: the files written per pulled reference, and the referrers listed.
"""

import json
import os
import sys

import oras.client


def main():
    host, repository, tag, subject, outdir = sys.argv[1:6]
    client = oras.client.OrasClient(hostname=host, insecure=True)
    result = {"pulled": {}, "referrers": []}
    by_tag = f"{host}/{repository}:{tag}"
    result["pulled"][by_tag] = client.pull(target=by_tag, outdir=os.path.join(outdir, "tag"))
    answer = client.do_request(
        f"http://{host}/v2/{repository}/referrers/{subject}",
        "GET",
        headers={"Accept": "application/vnd.oci.image.index.v1+json"},
    )
    answer.raise_for_status()
    for n, entry in enumerate(answer.json()["manifests"]):
        result["referrers"].append(entry)
        ref = f"{host}/{repository}@{entry['digest']}"
        result["pulled"][ref] = client.pull(target=ref, outdir=os.path.join(outdir, f"referrer-{n}"))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
