#!/usr/bin/env python3
"""A small S3 server whose objects are files: a GET costs the same whatever the object's size.

    python scripts/s3_file_server.py --root DIR --listen 127.0.0.1:PORT

moto answers every GET by copying the whole object, so a ranged GET of 2880 bytes of a
256 MiB object costs it as much as reading the object; a benchmark against it rewards
clients that send few GETs. Real S3 charges a GET its first-byte latency plus its bytes.
This server keeps each object in a file and answers a GET with ``sendfile`` of the range
asked for: a GET's cost is a small constant plus its bytes. Latency and per-connection
bandwidth are not its business: put ``scripts/tcp_proxy.py --delay-ms --bandwidth-mbps``
in front of it.

It speaks enough S3 (path-style requests, no authentication checked) for boto3,
lsst-resources, s3fs and rclone: buckets (create, head, list, location), objects (put,
copy, head, get with one ``Range``, delete, batch delete), multipart uploads, and
ListObjects v1 and v2 with prefix, delimiter and paging. ``GET /_stats`` answers the
counters of requests and body bytes sent, as JSON. Objects survive a restart on the same
``--root``. Standard library only.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import dataclasses
import email.utils
import hashlib
import http.server
import json
import os
import shutil
import signal
import socketserver
import sys
import threading
import time
import urllib.parse
import uuid
from xml.sax.saxutils import escape

_NS = "http://s3.amazonaws.com/doc/2006-03-01/"
_CHUNK = 1 << 20


@dataclasses.dataclass
class Obj:
    """One object: its file and what HEAD says about it."""

    path: str
    size: int
    etag: str
    mtime: float
    content_type: str = "binary/octet-stream"
    meta: dict[str, str] = dataclasses.field(default_factory=dict)


class Store:
    """Buckets of objects held as files under ``root/<bucket>/``; an index in memory.

    An object is ``<sha1 of key>`` (its bytes) beside ``<sha1 of key>.json`` (its key,
    ETag, type and metadata), so any key, however long, is a file name, and a restart
    finds every object again.
    """

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        os.makedirs(self.root, exist_ok=True)
        self.lock = threading.Lock()
        self.buckets: dict[str, dict[str, Obj]] = {}
        self.sorted_keys: dict[str, list[str]] = {}
        self.uploads: dict[str, tuple[str, str, str]] = {}  # id -> bucket, key, parts directory
        for bucket in sorted(os.listdir(self.root)):
            directory = os.path.join(self.root, bucket)
            if bucket.startswith(".") or not os.path.isdir(directory):
                continue
            objects = {}
            for name in os.listdir(directory):
                if not name.endswith(".json"):
                    continue
                with open(os.path.join(directory, name)) as stream:
                    info = json.load(stream)
                path = os.path.join(directory, name[: -len(".json")])
                with contextlib.suppress(FileNotFoundError):
                    stat = os.stat(path)
                    objects[info["key"]] = Obj(
                        path,
                        stat.st_size,
                        info["etag"],
                        stat.st_mtime,
                        info.get("content_type", "binary/octet-stream"),
                        info.get("meta", {}),
                    )
            self.buckets[bucket] = objects
            self.sorted_keys[bucket] = sorted(objects)

    def _file(self, bucket: str, key: str) -> str:
        return os.path.join(self.root, bucket, hashlib.sha1(key.encode()).hexdigest())

    def create_bucket(self, bucket: str) -> bool:
        with self.lock:
            if bucket in self.buckets:
                return False
            os.makedirs(os.path.join(self.root, bucket), exist_ok=True)
            self.buckets[bucket] = {}
            self.sorted_keys[bucket] = []
            return True

    def get(self, bucket: str, key: str) -> Obj | None:
        with self.lock:
            return self.buckets.get(bucket, {}).get(key)

    def put_file(
        self, bucket: str, key: str, temp: str, etag: str, content_type: str, meta: dict[str, str]
    ) -> Obj:
        """Move ``temp`` into place as the object ``key``."""
        path = self._file(bucket, key)
        os.replace(temp, path)
        stat = os.stat(path)
        obj = Obj(path, stat.st_size, etag, stat.st_mtime, content_type, meta)
        with open(path + ".json.tmp", "w") as stream:
            json.dump({"key": key, "etag": etag, "content_type": content_type, "meta": meta}, stream)
        os.replace(path + ".json.tmp", path + ".json")
        with self.lock:
            objects = self.buckets[bucket]
            if key not in objects:
                bisect.insort(self.sorted_keys[bucket], key)
            objects[key] = obj
        return obj

    def delete(self, bucket: str, key: str) -> None:
        with self.lock:
            obj = self.buckets.get(bucket, {}).pop(key, None)
            if obj is None:
                return
            keys = self.sorted_keys[bucket]
            del keys[bisect.bisect_left(keys, key)]
        for path in (obj.path, obj.path + ".json"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)

    def temp_path(self, bucket: str) -> str:
        return os.path.join(self.root, bucket, f".tmp-{uuid.uuid4().hex}")

    def listing(
        self, bucket: str, prefix: str, delimiter: str, after: str, limit: int
    ) -> tuple[list[tuple[str, Obj]], list[str], bool, str]:
        """Return (objects, common prefixes, truncated, last name returned) after ``after``."""
        with self.lock:
            keys = self.sorted_keys[bucket]
            objects = self.buckets[bucket]
            index = bisect.bisect_right(keys, after) if after else bisect.bisect_left(keys, prefix)
            contents: list[tuple[str, Obj]] = []
            prefixes: list[str] = []
            last = ""
            while index < len(keys):
                key = keys[index]
                if not key.startswith(prefix):
                    break
                if len(contents) + len(prefixes) >= limit:
                    return contents, prefixes, True, last
                cut = key.find(delimiter, len(prefix)) if delimiter else -1
                if cut >= 0:
                    common = key[: cut + len(delimiter)]
                    prefixes.append(common)
                    last = common
                    # Skip every key under this common prefix.
                    index = bisect.bisect_left(keys, common[:-1] + chr(ord(common[-1]) + 1))
                    continue
                contents.append((key, objects[key]))
                last = key
                index += 1
            return contents, prefixes, False, last


class Stats:
    """Counters shown at ``GET /_stats``."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: dict[str, int] = {}
        self.body_bytes_sent = 0

    def count(self, operation: str, sent: int = 0) -> None:
        with self.lock:
            self.requests[operation] = self.requests.get(operation, 0) + 1
            self.body_bytes_sent += sent

    def as_json(self) -> bytes:
        with self.lock:
            return json.dumps(
                {"requests": dict(self.requests), "body_bytes_sent": self.body_bytes_sent}
            ).encode()


def _iso(mtime: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(mtime))


class Handler(http.server.BaseHTTPRequestHandler):
    """One connection; requests are path-style ``/bucket/key?query``."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # else a small response waits for the client's delayed ACK (40 ms)
    server: Server

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 -- the base class's name
        if self.server.verbose:
            super().log_message(format, *args)

    # -- plumbing --------------------------------------------------------------------------

    def _parse(self) -> tuple[str, str, dict[str, str]]:
        parsed = urllib.parse.urlsplit(self.path)
        query = {k: v[-1] for k, v in urllib.parse.parse_qs(parsed.query, keep_blank_values=True).items()}
        path = urllib.parse.unquote(parsed.path)
        bucket, _, key = path.lstrip("/").partition("/")
        return bucket, key, query

    def _send(
        self,
        status: int,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
        content_type: str = "application/xml",
        head: bool = False,
    ) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if body or not head:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("x-amz-request-id", uuid.uuid4().hex[:16])
        self.end_headers()
        if body and not head:
            self.wfile.write(body)

    def _error(self, status: int, code: str, message: str, resource: str = "", head: bool = False) -> None:
        body = (
            f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
            f"<Message>{escape(message)}</Message><Resource>{escape(resource)}</Resource>"
            f"<RequestId>0</RequestId></Error>"
        ).encode()
        self.server.stats.count(f"error:{code}")
        self._send(status, b"" if head else body, head=head)

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _receive(self, bucket: str) -> tuple[str, str]:
        """Stream the request body to a temporary file; return (path, md5 hex)."""
        temp = self.server.store.temp_path(bucket)
        md5 = hashlib.md5()
        chunked = "aws-chunked" in (self.headers.get("Content-Encoding") or "")
        remaining = int(self.headers.get("Content-Length") or 0)
        with open(temp, "wb") as out:
            if chunked:
                self._receive_aws_chunked(out, md5)
            else:
                while remaining > 0:
                    data = self.rfile.read(min(_CHUNK, remaining))
                    if not data:
                        raise ConnectionError("client closed the connection mid-body")
                    out.write(data)
                    md5.update(data)
                    remaining -= len(data)
        return temp, md5.hexdigest()

    def _receive_aws_chunked(self, out, md5) -> None:
        """Decode ``aws-chunked`` (``size;chunk-signature=...`` chunks, then trailers)."""
        while True:
            line = self.rfile.readline().decode().strip()
            size = int(line.split(";", 1)[0], 16)
            if size == 0:
                while self.rfile.readline().strip():  # trailers, then a blank line
                    pass
                return
            data = self.rfile.read(size)
            out.write(data)
            md5.update(data)
            self.rfile.readline()

    def _bucket_exists(self, bucket: str, head: bool = False) -> bool:
        if bucket in self.server.store.buckets:
            return True
        self._error(404, "NoSuchBucket", "The specified bucket does not exist", bucket, head=head)
        return False

    # -- verbs -----------------------------------------------------------------------------

    def do_GET(self) -> None:
        bucket, key, query = self._parse()
        if bucket == "_stats":
            self._send(200, self.server.stats.as_json(), content_type="application/json")
            return
        if not bucket:
            self._list_buckets()
        elif not self._bucket_exists(bucket):
            return
        elif not key:
            if "location" in query:
                self.server.stats.count("GetBucketLocation")
                self._send(
                    200,
                    f'<?xml version="1.0" encoding="UTF-8"?><LocationConstraint xmlns="{_NS}">'
                    f"</LocationConstraint>".encode(),
                )
            elif any(q in query for q in ("versioning", "acl", "policy", "uploads", "tagging")):
                self._error(501, "NotImplemented", f"not implemented: {sorted(query)}", bucket)
            else:
                self._list_objects(bucket, query)
        else:
            self._get_object(bucket, key, head=False)

    def do_HEAD(self) -> None:
        bucket, key, _ = self._parse()
        if not key:
            self.server.stats.count("HeadBucket")
            if self._bucket_exists(bucket, head=True):
                self._send(200, head=True, headers={"x-amz-bucket-region": "us-east-1"})
            return
        if self._bucket_exists(bucket, head=True):
            self._get_object(bucket, key, head=True)

    def do_PUT(self) -> None:
        bucket, key, query = self._parse()
        store = self.server.store
        if not key:
            self._body()
            self.server.stats.count("CreateBucket")
            if not store.create_bucket(bucket):
                self._error(409, "BucketAlreadyOwnedByYou", "bucket exists", bucket)
                return
            self._send(200, headers={"Location": f"/{bucket}"})
            return
        if not self._bucket_exists(bucket):
            self._body()
            return
        if "uploadId" in query:
            self._upload_part(bucket, key, query)
            return
        source = self.headers.get("x-amz-copy-source")
        if source:
            self._body()
            self._copy(bucket, key, urllib.parse.unquote(source))
            return
        temp, md5 = self._receive(bucket)
        obj = store.put_file(
            bucket,
            key,
            temp,
            f'"{md5}"',
            self.headers.get("Content-Type") or "binary/octet-stream",
            self._meta(),
        )
        self.server.stats.count("PutObject")
        self._send(200, headers={"ETag": obj.etag})

    def do_POST(self) -> None:
        bucket, key, query = self._parse()
        if not self._bucket_exists(bucket):
            self._body()
            return
        if not key and "delete" in query:
            self._delete_many(bucket)
        elif "uploads" in query:
            self._body()
            self._start_upload(bucket, key)
        elif "uploadId" in query:
            self._complete_upload(bucket, key, query)
        else:
            self._body()
            self._error(501, "NotImplemented", "unsupported POST", key)

    def do_DELETE(self) -> None:
        bucket, key, query = self._parse()
        self._body()
        if not self._bucket_exists(bucket):
            return
        if "uploadId" in query:
            upload = self.server.store.uploads.pop(query["uploadId"], None)
            if upload is not None:
                shutil.rmtree(upload[2], ignore_errors=True)
        elif key:
            self.server.store.delete(bucket, key)
        self.server.stats.count("Delete")
        self._send(204)

    # -- operations ------------------------------------------------------------------------

    def _meta(self) -> dict[str, str]:
        return {k.lower(): v for k, v in self.headers.items() if k.lower().startswith("x-amz-meta-")}

    def _object_headers(self, obj: Obj) -> dict[str, str]:
        return {
            "ETag": obj.etag,
            "Last-Modified": email.utils.formatdate(obj.mtime, usegmt=True),
            "Accept-Ranges": "bytes",
            **obj.meta,
        }

    def _get_object(self, bucket: str, key: str, head: bool) -> None:
        obj = self.server.store.get(bucket, key)
        if obj is None:
            self._error(404, "NoSuchKey", "The specified key does not exist.", key, head=head)
            return
        start, end = 0, obj.size  # [start, end)
        status = 200
        headers = self._object_headers(obj)
        spec = self.headers.get("Range")
        if spec and spec.startswith("bytes=") and "," not in spec:
            first, _, last = spec[len("bytes=") :].strip().partition("-")
            if first:
                start = int(first)
                end = min(obj.size, int(last) + 1) if last else obj.size
            elif last:
                start = max(0, obj.size - int(last))
            if start >= obj.size or end <= start:
                headers["Content-Range"] = f"bytes */{obj.size}"
                self.server.stats.count("GetObject:416")
                self._error(416, "InvalidRange", "The requested range is not satisfiable", key, head=head)
                return
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{obj.size}"
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Type", obj.content_type)
        self.send_header("Content-Length", str(end - start))
        self.end_headers()
        if head:
            self.server.stats.count("HeadObject")
            return
        sent = 0
        with open(obj.path, "rb") as source:
            while sent < end - start:
                count = os.sendfile(
                    self.connection.fileno(), source.fileno(), start + sent, min(8 << 20, end - start - sent)
                )
                if count == 0:
                    break
                sent += count
        self.server.stats.count("GetObject", sent)

    def _copy(self, bucket: str, key: str, source: str) -> None:
        src_bucket, _, src_key = source.lstrip("/").partition("/")
        obj = self.server.store.get(src_bucket, src_key.partition("?")[0])
        if obj is None:
            self._error(404, "NoSuchKey", "The specified key does not exist.", source)
            return
        temp = self.server.store.temp_path(bucket)
        shutil.copyfile(obj.path, temp)
        new = self.server.store.put_file(bucket, key, temp, obj.etag, obj.content_type, obj.meta)
        self.server.stats.count("CopyObject")
        body = (
            f'<?xml version="1.0" encoding="UTF-8"?><CopyObjectResult xmlns="{_NS}"><LastModified>'
            f"{_iso(new.mtime)}</LastModified><ETag>{escape(new.etag)}</ETag></CopyObjectResult>"
        )
        self._send(200, body.encode())

    def _delete_many(self, bucket: str) -> None:
        import xml.etree.ElementTree as ET

        root = ET.fromstring(self._body())
        deleted = []
        for element in root.iter():
            if element.tag.endswith("Key") and element.text is not None:
                self.server.store.delete(bucket, element.text)
                deleted.append(f"<Deleted><Key>{escape(element.text)}</Key></Deleted>")
        self.server.stats.count("DeleteObjects")
        body = (f'<?xml version="1.0" encoding="UTF-8"?><DeleteResult xmlns="{_NS}">{"".join(deleted)}'
                "</DeleteResult>")
        self._send(200, body.encode())

    def _start_upload(self, bucket: str, key: str) -> None:
        upload_id = uuid.uuid4().hex
        directory = os.path.join(self.server.store.root, ".uploads", upload_id)
        os.makedirs(directory)
        self.server.store.uploads[upload_id] = (bucket, key, directory)
        self.server.stats.count("CreateMultipartUpload")
        body = (
            f'<?xml version="1.0" encoding="UTF-8"?><InitiateMultipartUploadResult xmlns="{_NS}">'
            f"<Bucket>{escape(bucket)}</Bucket><Key>{escape(key)}</Key><UploadId>{upload_id}</UploadId>"
            "</InitiateMultipartUploadResult>"
        )
        self._send(200, body.encode())

    def _upload_part(self, bucket: str, key: str, query: dict[str, str]) -> None:
        upload = self.server.store.uploads.get(query["uploadId"])
        if upload is None:
            self._body()
            self._error(404, "NoSuchUpload", "no such upload", key)
            return
        temp, md5 = self._receive(bucket)
        os.replace(temp, os.path.join(upload[2], f"{int(query['partNumber']):05d}"))
        with open(os.path.join(upload[2], f"{int(query['partNumber']):05d}.md5"), "w") as stream:
            stream.write(md5)
        self.server.stats.count("UploadPart")
        self._send(200, headers={"ETag": f'"{md5}"'})

    def _complete_upload(self, bucket: str, key: str, query: dict[str, str]) -> None:
        self._body()
        upload = self.server.store.uploads.pop(query["uploadId"], None)
        if upload is None:
            self._error(404, "NoSuchUpload", "no such upload", key)
            return
        directory = upload[2]
        parts = sorted(name for name in os.listdir(directory) if name.isdigit())
        temp = self.server.store.temp_path(bucket)
        digests = b""
        with open(temp, "wb") as out:
            for name in parts:
                with open(os.path.join(directory, name), "rb") as part:
                    shutil.copyfileobj(part, out, _CHUNK)
                with open(os.path.join(directory, name + ".md5")) as stream:
                    digests += bytes.fromhex(stream.read())
        shutil.rmtree(directory, ignore_errors=True)
        etag = f'"{hashlib.md5(digests).hexdigest()}-{len(parts)}"'
        self.server.store.put_file(bucket, key, temp, etag, "binary/octet-stream", {})
        self.server.stats.count("CompleteMultipartUpload")
        body = (
            f'<?xml version="1.0" encoding="UTF-8"?><CompleteMultipartUploadResult xmlns="{_NS}">'
            f"<Bucket>{escape(bucket)}</Bucket><Key>{escape(key)}</Key><ETag>{escape(etag)}</ETag>"
            "</CompleteMultipartUploadResult>"
        )
        self._send(200, body.encode())

    def _list_buckets(self) -> None:
        names = "".join(
            f"<Bucket><Name>{escape(b)}</Name><CreationDate>{_iso(0)}</CreationDate></Bucket>"
            for b in sorted(self.server.store.buckets)
        )
        self.server.stats.count("ListBuckets")
        body = (
            f'<?xml version="1.0" encoding="UTF-8"?><ListAllMyBucketsResult xmlns="{_NS}"><Owner><ID>o'
            f"</ID></Owner><Buckets>{names}</Buckets></ListAllMyBucketsResult>"
        )
        self._send(200, body.encode())

    def _list_objects(self, bucket: str, query: dict[str, str]) -> None:
        v2 = query.get("list-type") == "2"
        prefix = query.get("prefix", "")
        delimiter = query.get("delimiter", "")
        limit = max(0, min(1000, int(query.get("max-keys") or 1000)))
        encode = query.get("encoding-type") == "url"

        def enc(text: str) -> str:
            return escape(urllib.parse.quote(text, safe="/") if encode else text)

        if v2:
            after = query.get("continuation-token") or query.get("start-after", "")
        else:
            after = query.get("marker", "")
        contents, prefixes, truncated, last = self.server.store.listing(
            bucket, prefix, delimiter, after, limit
        )
        items = "".join(
            f"<Contents><Key>{enc(key)}</Key><LastModified>{_iso(obj.mtime)}</LastModified>"
            f"<ETag>{escape(obj.etag)}</ETag><Size>{obj.size}</Size><StorageClass>STANDARD</StorageClass>"
            "</Contents>"
            for key, obj in contents
        )
        items += "".join(f"<CommonPrefixes><Prefix>{enc(p)}</Prefix></CommonPrefixes>" for p in prefixes)
        head = (
            f"<Name>{escape(bucket)}</Name><Prefix>{enc(prefix)}</Prefix><MaxKeys>{limit}</MaxKeys>"
            + (f"<Delimiter>{enc(delimiter)}</Delimiter>" if delimiter else "")
            + ("<EncodingType>url</EncodingType>" if encode else "")
            + f"<IsTruncated>{'true' if truncated else 'false'}</IsTruncated>"
        )
        if v2:
            head += f"<KeyCount>{len(contents) + len(prefixes)}</KeyCount>"
            if query.get("continuation-token"):
                head += f"<ContinuationToken>{escape(query['continuation-token'])}</ContinuationToken>"
            if truncated:
                head += f"<NextContinuationToken>{escape(last)}</NextContinuationToken>"
        else:
            head += f"<Marker>{enc(after)}</Marker>"
            if truncated:
                head += f"<NextMarker>{enc(last)}</NextMarker>"
        self.server.stats.count("ListObjectsV2" if v2 else "ListObjects")
        body = (f'<?xml version="1.0" encoding="UTF-8"?><ListBucketResult xmlns="{_NS}">{head}{items}'
                "</ListBucketResult>")
        self._send(200, body.encode())


class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    """A thread per connection."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], store: Store, verbose: bool) -> None:
        super().__init__(address, Handler)
        self.store = store
        self.stats = Stats()
        self.verbose = verbose


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    return host, int(port)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True, help="directory holding the buckets (created)")
    parser.add_argument("--listen", type=_address, required=True, metavar="HOST:PORT")
    parser.add_argument("--verbose", action="store_true", help="log every request on stderr")
    args = parser.parse_args(argv)
    server = Server(args.listen, Store(args.root), args.verbose)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    print(
        f"s3_file_server: {args.listen[0]}:{args.listen[1]} serving {args.root}", file=sys.stderr, flush=True
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
