"""Code shared by Snapwake's services, model server and tools. It imports no service.

    errors.py       the one error tree, with its gRPC codes and HTTP statuses
    config.py       frozen, validated configuration; service.py the one bootstrap of every main
    log.py          logging; telemetry.py tracing, metrics and the one traceparent()
    keys.py         the etcd key layout; lifecycle.py the instance lifecycle and its state sets
    etcd.py         the etcd edge: EtcdClient, Etcd over aetcd (TLS), LeaseKeeper; etcd_fake.py FakeEtcd
    etcdauth.py     etcd users and roles per service, the idempotent auth bootstrap
    grpcserver.py   the gRPC server edge (health, reflection, the ErrorInterceptor)
    grpcclient.py   the gRPC client edge (channel, call, stream: the one RpcError translation)
    cuda.py         the CUDA driver edge: lazy bindings and the one result check
    openai/         the OpenAI error body and request schema shared by gateway and model server
    protocols.py    the node's two Unix-socket protocols (control, handover)
    cli.py          the snapwake admin CLI; devcluster.py ``make run``; testing.py test helpers
    protogen.py     ``make proto``; v1/ the generated code
"""
