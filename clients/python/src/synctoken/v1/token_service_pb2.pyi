import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ErrorReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ERROR_REASON_UNSPECIFIED: _ClassVar[ErrorReason]
    ERROR_REASON_INVALID_REQUEST: _ClassVar[ErrorReason]
    ERROR_REASON_CALLER_UNAUTHENTICATED: _ClassVar[ErrorReason]
    ERROR_REASON_CALLER_NOT_ALLOWED: _ClassVar[ErrorReason]
    ERROR_REASON_SERVICE_NOT_ALLOWED: _ClassVar[ErrorReason]
    ERROR_REASON_IDENTITY_NOT_ALLOWED: _ClassVar[ErrorReason]
    ERROR_REASON_AUDIT_UNAVAILABLE: _ClassVar[ErrorReason]
    ERROR_REASON_INTERNAL: _ClassVar[ErrorReason]
    ERROR_REASON_MALFORMED_REQUEST: _ClassVar[ErrorReason]
    ERROR_REASON_RATE_LIMITED: _ClassVar[ErrorReason]
    ERROR_REASON_FORWARDED_CLIENT_CERT_UNTRUSTED: _ClassVar[ErrorReason]
    ERROR_REASON_RATE_LIMIT_UNAVAILABLE: _ClassVar[ErrorReason]
ERROR_REASON_UNSPECIFIED: ErrorReason
ERROR_REASON_INVALID_REQUEST: ErrorReason
ERROR_REASON_CALLER_UNAUTHENTICATED: ErrorReason
ERROR_REASON_CALLER_NOT_ALLOWED: ErrorReason
ERROR_REASON_SERVICE_NOT_ALLOWED: ErrorReason
ERROR_REASON_IDENTITY_NOT_ALLOWED: ErrorReason
ERROR_REASON_AUDIT_UNAVAILABLE: ErrorReason
ERROR_REASON_INTERNAL: ErrorReason
ERROR_REASON_MALFORMED_REQUEST: ErrorReason
ERROR_REASON_RATE_LIMITED: ErrorReason
ERROR_REASON_FORWARDED_CLIENT_CERT_UNTRUSTED: ErrorReason
ERROR_REASON_RATE_LIMIT_UNAVAILABLE: ErrorReason

class IssueTokenRequest(_message.Message):
    __slots__ = ("identity", "sync", "ttl", "region", "validate_only")
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    SYNC_FIELD_NUMBER: _ClassVar[int]
    TTL_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    VALIDATE_ONLY_FIELD_NUMBER: _ClassVar[int]
    identity: str
    sync: SyncGrant
    ttl: _duration_pb2.Duration
    region: str
    validate_only: bool
    def __init__(self, identity: _Optional[str] = ..., sync: _Optional[_Union[SyncGrant, _Mapping]] = ..., ttl: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., region: _Optional[str] = ..., validate_only: _Optional[bool] = ...) -> None: ...

class SyncGrant(_message.Message):
    __slots__ = ("service_sid", "endpoint_id")
    SERVICE_SID_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_ID_FIELD_NUMBER: _ClassVar[int]
    service_sid: str
    endpoint_id: str
    def __init__(self, service_sid: _Optional[str] = ..., endpoint_id: _Optional[str] = ...) -> None: ...

class IssueTokenResponse(_message.Message):
    __slots__ = ("token", "identity", "issued_at", "expires_at", "refresh_after", "token_id")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    ISSUED_AT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    REFRESH_AFTER_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    token: str
    identity: str
    issued_at: _timestamp_pb2.Timestamp
    expires_at: _timestamp_pb2.Timestamp
    refresh_after: _timestamp_pb2.Timestamp
    token_id: str
    def __init__(self, token: _Optional[str] = ..., identity: _Optional[str] = ..., issued_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., refresh_after: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., token_id: _Optional[str] = ...) -> None: ...

class GetCallerIdentityRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetCallerIdentityResponse(_message.Message):
    __slots__ = ("caller_id", "policy")
    CALLER_ID_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    caller_id: str
    policy: CallerPolicy
    def __init__(self, caller_id: _Optional[str] = ..., policy: _Optional[_Union[CallerPolicy, _Mapping]] = ...) -> None: ...

class CallerPolicy(_message.Message):
    __slots__ = ("matched_caller", "sync_service_sids", "default_sync_service_sid", "identity_pattern", "allowed_identity_characters", "default_ttl", "max_ttl")
    MATCHED_CALLER_FIELD_NUMBER: _ClassVar[int]
    SYNC_SERVICE_SIDS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_SYNC_SERVICE_SID_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_PATTERN_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_IDENTITY_CHARACTERS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_TTL_FIELD_NUMBER: _ClassVar[int]
    MAX_TTL_FIELD_NUMBER: _ClassVar[int]
    matched_caller: str
    sync_service_sids: _containers.RepeatedScalarFieldContainer[str]
    default_sync_service_sid: str
    identity_pattern: str
    allowed_identity_characters: str
    default_ttl: _duration_pb2.Duration
    max_ttl: _duration_pb2.Duration
    def __init__(self, matched_caller: _Optional[str] = ..., sync_service_sids: _Optional[_Iterable[str]] = ..., default_sync_service_sid: _Optional[str] = ..., identity_pattern: _Optional[str] = ..., allowed_identity_characters: _Optional[str] = ..., default_ttl: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., max_ttl: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...
