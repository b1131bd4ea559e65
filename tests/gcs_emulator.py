"""`python -m tests.gcs_emulator PORT BUCKET`: gcp-storage-emulator (a GCS JSON API server,
in memory) that also sends the object generation with each download.

Real GCS sends `x-goog-generation` with object data; tensorstore (Orbax's backend) needs it
to read OCDBT manifests back ("Malformed StorageGeneration" without it), and the emulator
(2026.7.19) leaves it out.
"""

import sys
import threading

from gcp_storage_emulator.handlers import objects

_download = objects.download


def _download_with_generation(request, response, storage, *args, **kwargs):
    _download(request, response, storage, *args, **kwargs)
    try:
        obj = storage.get_file_obj(request.params["bucket_name"],
                                   request.params["object_id"])
    except Exception:  # noqa: BLE001 - not found: the 404 is already set
        return
    response["x-goog-generation"] = obj["generation"]
    response["x-goog-metageneration"] = obj.get("metageneration", "1")


objects.download = _download_with_generation  # before server.py builds its routes

from gcp_storage_emulator.server import create_server  # noqa: E402


def main(port: int, bucket: str) -> None:
    server = create_server("localhost", port, in_memory=True, default_bucket=bucket)
    server.start()
    threading.Event().wait()


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
