"""gRPC server reflection, both protocol versions, serving the contract with its comments.

Owns what a generic tool (grpcurl, grpcui, Postman, an IDE) learns from the running service. Promises:
- `grpc.reflection.v1.ServerReflection` and `grpc.reflection.v1alpha.ServerReflection` both answer (tools
  try v1 first, older ones speak only v1alpha); the two are the same protocol under two package names, so
  one servicer built on grpcio-reflection's generated v1alpha messages serves both (grpcio-reflection
  ships no v1 module; the v1 file it describes is v1alpha's descriptor renamed);
- `list_services` names every service served here; `file_by_filename` and `file_containing_symbol` answer
  the FileDescriptorProto of the file (and its imports); an unknown name is an in-stream NOT_FOUND error
  response, as the protocol says, never a failed call;
- memflow/v1/memory.proto is served *with* its source_code_info (gen/memory_descriptor.py, built by
  protos/generate.py with --include_source_info): the .proto's comments - limits, defaults, units, error
  rules - reach tools that only have reflection. Other files are served as the process's descriptor pool
  holds them.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection_pb2 as rpb

from memory_service.wire.gen import memory_descriptor

V1ALPHA = "grpc.reflection.v1alpha.ServerReflection"
V1 = "grpc.reflection.v1.ServerReflection"
_METHOD = "ServerReflectionInfo"


def _v1_file() -> descriptor_pb2.FileDescriptorProto:
    """grpc/reflection/v1/reflection.proto: v1alpha's file with the package renamed (the messages are equal)."""
    proto = descriptor_pb2.FileDescriptorProto()
    rpb.DESCRIPTOR.CopyToProto(proto)
    old, new = "." + proto.package + ".", ".grpc.reflection.v1."
    proto.name, proto.package = "grpc/reflection/v1/reflection.proto", "grpc.reflection.v1"
    proto.options.Clear()
    proto.options.java_package, proto.options.java_multiple_files = "io.grpc.reflection.v1", True
    proto.options.java_outer_classname = "ServerReflectionProto"
    proto.options.go_package = "google.golang.org/grpc/reflection/grpc_reflection_v1"

    def rename(messages) -> None:
        for message in messages:
            for field in message.field:
                if field.type_name.startswith(old):
                    field.type_name = new + field.type_name[len(old):]
            rename(message.nested_type)

    rename(proto.message_type)
    for service in proto.service:
        for method in service.method:
            method.input_type = new + method.input_type[len(old):]
            method.output_type = new + method.output_type[len(old):]
    return proto


def _symbols(proto: descriptor_pb2.FileDescriptorProto) -> Iterator[str]:
    """Every fully qualified name the file defines (messages, nested types, enums, services, methods)."""
    prefix = proto.package + "." if proto.package else ""

    def walk(scope: str, messages, enums) -> Iterator[str]:
        for enum in enums:
            yield scope + enum.name
        for message in messages:
            yield scope + message.name
            yield from walk(scope + message.name + ".", message.nested_type, message.enum_type)

    yield from walk(prefix, proto.message_type, proto.enum_type)
    for service in proto.service:
        yield prefix + service.name
        for method in service.method:
            yield f"{prefix}{service.name}.{method.name}"


class ReflectionServicer:
    """Answers ServerReflectionInfo for the given services from their files (see the module docstring)."""

    def __init__(self, service_names: Iterable[str], pool=None) -> None:
        pool = pool or descriptor_pool.Default()
        self.service_names = tuple(sorted({*service_names, V1, V1ALPHA}))
        self._files: dict[str, descriptor_pb2.FileDescriptorProto] = {}  # by file name
        self._by_symbol: dict[str, str] = {}  # fully qualified name -> file name
        self._add(descriptor_pb2.FileDescriptorProto.FromString(memory_descriptor.FILE_DESCRIPTOR_PROTO))
        self._add(_v1_file())
        for name in self.service_names:
            if name not in self._by_symbol:
                self._add_from_pool(pool, pool.FindFileContainingSymbol(name).name)

    def _add(self, proto: descriptor_pb2.FileDescriptorProto) -> None:
        self._files[proto.name] = proto
        self._by_symbol.update(dict.fromkeys(_symbols(proto), proto.name))

    def _add_from_pool(self, pool, name: str) -> None:
        if name in self._files:
            return
        proto = descriptor_pb2.FileDescriptorProto()
        pool.FindFileByName(name).CopyToProto(proto)
        self._add(proto)
        for dependency in proto.dependency:
            self._add_from_pool(pool, dependency)

    def _file_response(self, name: str) -> rpb.ServerReflectionResponse:
        order, todo = [], [name]
        while todo:  # the file first, then everything it imports
            current = todo.pop(0)
            if current not in order:
                order.append(current)
                todo.extend(self._files[current].dependency)
        files = [self._files[n].SerializeToString(deterministic=True) for n in order]
        return rpb.ServerReflectionResponse(file_descriptor_response=rpb.FileDescriptorResponse(
            file_descriptor_proto=files))

    def _answer(self, request: rpb.ServerReflectionRequest) -> rpb.ServerReflectionResponse:
        kind = request.WhichOneof("message_request")
        if kind == "list_services":
            response = rpb.ServerReflectionResponse(list_services_response=rpb.ListServiceResponse(
                service=[rpb.ServiceResponse(name=n) for n in self.service_names]))
        elif kind == "file_by_filename" and request.file_by_filename in self._files:
            response = self._file_response(request.file_by_filename)
        elif kind == "file_containing_symbol" and request.file_containing_symbol in self._by_symbol:
            response = self._file_response(self._by_symbol[request.file_containing_symbol])
        elif kind == "all_extension_numbers_of_type" and request.all_extension_numbers_of_type in self._by_symbol:
            response = rpb.ServerReflectionResponse(all_extension_numbers_response=rpb.ExtensionNumberResponse(
                base_type_name=request.all_extension_numbers_of_type))  # the contract declares no extensions
        elif kind in ("file_by_filename", "file_containing_symbol", "file_containing_extension",
                      "all_extension_numbers_of_type"):
            response = _error(grpc.StatusCode.NOT_FOUND, f"{kind} {getattr(request, kind)!s:.200} is not served here")
        else:
            response = _error(grpc.StatusCode.INVALID_ARGUMENT, "ServerReflectionRequest names no request")
        response.valid_host = request.host
        response.original_request.CopyFrom(request)
        return response

    def ServerReflectionInfo(self, request_iterator, context) -> Iterator[rpb.ServerReflectionResponse]:
        for request in request_iterator:
            yield self._answer(request)


def _error(code: grpc.StatusCode, message: str) -> rpb.ServerReflectionResponse:
    return rpb.ServerReflectionResponse(error_response=rpb.ErrorResponse(error_code=code.value[0],
                                                                         error_message=message))


def enable(server: grpc.Server, service_names: Iterable[str]) -> ReflectionServicer:
    """Serve reflection (v1 and v1alpha) on `server` for `service_names` (the reflection services are added)."""
    servicer = ReflectionServicer(service_names)
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo, request_deserializer=rpb.ServerReflectionRequest.FromString,
        response_serializer=rpb.ServerReflectionResponse.SerializeToString)
    server.add_generic_rpc_handlers(tuple(grpc.method_handlers_generic_handler(name, {_METHOD: handler})
                                          for name in (V1, V1ALPHA)))
    return servicer
