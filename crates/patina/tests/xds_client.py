"""A stock gRPC xDS client and the servers it calls, for crates/patina/tests/xds_grpc.rs.

Starts one gRPC server per name given (each answers /patina.test.Echo/Who with its name),
prints "server NAME IP:PORT" for each, then calls xds:///APP through grpcio's own xDS
resolver and balancer (GRPC_XDS_BOOTSTRAP names the Patina agent) every 20 ms, printing one
line per call: "call MS ok NAME" or "call MS fail CODE". Commands on stdin: "stop NAME"
stops that server (its port then refuses connections); "quit" or end of input ends the
run, and so does --secs. No Patina code: only grpcio.
"""

import argparse
import sys
import threading
import time
from concurrent import futures

import grpc

METHOD = "/patina.test.Echo/Who"


def serve(name, ip):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    handler = grpc.method_handlers_generic_handler(
        "patina.test.Echo",
        {"Who": grpc.unary_unary_rpc_method_handler(lambda req, ctx: name.encode())},
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port(f"{ip}:0")
    server.start()
    return server, port


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--target", required=True)
    p.add_argument("--server", action="append", default=[], help="NAME=IP")
    p.add_argument("--secs", type=float, default=120.0)
    p.add_argument("--every-ms", type=float, default=20.0)
    args = p.parse_args()

    servers = {}
    for spec in args.server:
        name, ip = spec.split("=", 1)
        server, port = serve(name, ip)
        servers[name] = server
        print(f"server {name} {ip}:{port}", flush=True)

    done = threading.Event()

    def commands():
        for line in sys.stdin:
            words = line.split()
            if words[:1] == ["stop"] and len(words) == 2 and words[1] in servers:
                servers[words[1]].stop(grace=None).wait()
                print(f"stopped {words[1]}", flush=True)
            elif words[:1] == ["quit"]:
                break
        done.set()

    threading.Thread(target=commands, daemon=True).start()

    start = time.monotonic()
    channel = grpc.insecure_channel(args.target)
    who = channel.unary_unary(METHOD)
    while not done.is_set() and time.monotonic() - start < args.secs:
        ms = int((time.monotonic() - start) * 1000)
        try:
            name = who(b"", timeout=1.0).decode()
            print(f"call {ms} ok {name}", flush=True)
        except grpc.RpcError as e:
            print(f"call {ms} fail {e.code().name}", flush=True)
        time.sleep(args.every_ms / 1000.0)
    channel.close()
    for s in servers.values():
        s.stop(grace=None)


if __name__ == "__main__":
    main()
