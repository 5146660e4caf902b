"""Request bytes to messages, never failing with an exception.

gRPC's own handling of a request it cannot parse is UNKNOWN with the parser's Python exception
in the message. Here the deserializer returns an ``Undecodable`` instead, whose reason names the
field (``stopping.stop[1] is not valid UTF-8``), and the service refuses it with
INVALID_ARGUMENT like any other bad input. To find the field, the bytes are parsed again as a
twin of the message whose string fields are bytes fields (the same wire format, no UTF-8 check),
and each of those is decoded in turn.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError

from hedgerow.server.rpc import generation_pb2 as pb

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Generation"].full_name  # "hedgerow.v1.Generation"
_TWIN_PACKAGE = "hedgerow.v1.bytes_twin"


@dataclass(frozen=True)
class Undecodable:
    """A request whose bytes are not a valid message; ``reason`` names the field when one is to blame."""

    reason: str


def _twin_pool() -> descriptor_pool.DescriptorPool:
    """The proto file of the service, copied into a package of its own with every string field
    made a bytes field."""
    proto = descriptor_pb2.FileDescriptorProto()
    pb.DESCRIPTOR.CopyToProto(proto)
    proto.name, old = "hedgerow/v1/bytes_twin.proto", proto.package
    proto.package = _TWIN_PACKAGE
    del proto.service[:]

    def retype(messages) -> None:
        for m in messages:
            for f in m.field:
                if f.type == FieldDescriptor.TYPE_STRING:
                    f.type = FieldDescriptor.TYPE_BYTES
                if f.type_name.startswith(f".{old}."):
                    f.type_name = f".{_TWIN_PACKAGE}." + f.type_name[len(old) + 2:]
            retype(m.nested_type)

    retype(proto.message_type)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return pool


_POOL = _twin_pool()


def _bad_utf8(msg, prefix: str = "") -> str | None:
    """The first field of a twin message holding bytes that are not UTF-8, as a field path."""
    for field, value in msg.ListFields():
        name = prefix + field.name
        items = list(enumerate(value)) if field.is_repeated else [(None, value)]
        for i, item in items:
            where = name if i is None else f"{name}[{i}]"
            if field.type == FieldDescriptor.TYPE_BYTES:
                try:
                    item.decode("utf-8")
                except UnicodeDecodeError as exc:
                    return f"{where} is not valid UTF-8 (byte {exc.start})"
            elif field.type == FieldDescriptor.TYPE_MESSAGE:
                found = _bad_utf8(item, where + ".")
                if found:
                    return found
    return None


def decoder(message_class):
    """A request deserializer for ``message_class`` that returns ``Undecodable`` rather than raising."""
    twin = message_factory.GetMessageClass(
        _POOL.FindMessageTypeByName(f"{_TWIN_PACKAGE}.{message_class.DESCRIPTOR.name}"))
    full_name = message_class.DESCRIPTOR.full_name

    def decode(data: bytes):
        try:
            return message_class.FromString(data)
        except DecodeError:
            pass
        try:
            reason = _bad_utf8(twin.FromString(data))
        except DecodeError:
            reason = None
        return Undecodable(reason or f"the request is not a valid {full_name} message (its bytes do not parse)")

    return decode


def add_generation_service(servicer, server) -> None:
    """Register ``servicer`` as the Generation service, as the generated
    ``add_GenerationServicer_to_server`` does, with ``decoder`` as the request deserializer."""
    handlers = {
        "Generate": grpc.unary_unary_rpc_method_handler(
            servicer.Generate, request_deserializer=decoder(pb.GenerateRequest),
            response_serializer=pb.GenerateResponse.SerializeToString),
        "GenerateStream": grpc.unary_stream_rpc_method_handler(
            servicer.GenerateStream, request_deserializer=decoder(pb.GenerateRequest),
            response_serializer=pb.GenerateStreamResponse.SerializeToString),
        "ModelInfo": grpc.unary_unary_rpc_method_handler(
            servicer.ModelInfo, request_deserializer=decoder(pb.ModelInfoRequest),
            response_serializer=pb.ModelInfoResponse.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)
