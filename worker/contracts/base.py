"""What a contract is: a field table from which its pydantic model, its table and its messages follow.

A contract module declares its fields once (``Text``, ``Decimal``, ``Choice``); ``Contract`` builds the
validator and the SQLAlchemy table from them, so the two can never disagree. The same table also gives a
fast path for items that are plainly valid (see ``Contract.plain_records``).
"""

from __future__ import annotations

import contextlib
import json
import operator
import re
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from decimal import MAX_EMAX, MIN_EMIN, Context, InvalidOperation
from decimal import Decimal as PyDecimal
from itertools import compress, repeat
from typing import Annotated, Any, Literal

import jiter
import msgspec
from jiter import LosslessFloat
from msgspec import UNSET, UnsetType
from pydantic import (
    BaseModel,
    ConfigDict,
    PlainValidator,
    StringConstraints,
    ValidationError,
    create_model,
)
from pydantic_core import PydanticCustomError
from sqlalchemy import (
    CheckConstraint,
    Column,
    DateTime,
    Numeric,
    String,
    Table,
    UniqueConstraint,
    Uuid,
    func,
)
from sqlalchemy import types as sa_types
from sqlalchemy.engine import Dialect

from worker.models import Base

REQUIRED = "Field is required"
MUST_BE_STRING = "Field must be a string"
UNKNOWN_FIELD = "Unknown field"
ITEM_MUST_BE_OBJECT = "Item must be an object"
DECIMAL_TYPE = "Field must be of type decimal"
DECIMAL_FORMAT = "Field must be a valid decimal (e.g., 1.5, 10.25)"
DECIMAL_NOT_FINITE = "Field must be a valid decimal number"
# PostgreSQL text cannot hold NUL; refusing it here keeps one bad item from failing its whole chunk.
INVALID_CHARACTERS = "Field must not contain NUL characters"
# RFC 8259 leaves a repeated key's meaning open: which of the two values the client meant cannot be known.
REPEATED = "Field appears more than once"

# ASCII digits only: `\d` would also take Arabic-Indic or full-width digits, which Decimal() reads as well.
_PLAIN_DECIMAL = re.compile(r"[+-]?[0-9]+(?:\.[0-9]+)?")
# A JSON number with an exponent, in parts: sign, integer digits, fraction digits, exponent.
_JSON_NUMBER = re.compile(r"(-?)([0-9]+)(?:\.([0-9]+))?[eE]([+-]?[0-9]+)")
# Anchored: pydantic-core searches for a pattern anywhere in the string.
_NO_NUL = r"^[^\x00]*$"
_NOT_FINITE = {"nan", "+nan", "-nan", "snan", "inf", "+inf", "-inf", "infinity", "+infinity", "-infinity"}

ItemErrors = list[dict[str, str]]
_JSON_NULL = msgspec.Raw(b"null")
# A JSON text that might hold NUL, which the fast path does not check for.
_NUL_ESCAPE = b"\\u0000"
# Null in the text format of COPY.
COPY_NULL = "\\N"

# A JSON array split into the texts of its elements, each byte for byte, without building them (msgspec
# checks their syntax as it skips them): the receiver splits bodies with it, and a worker the chunks that a
# receiver of before migration 0008 stored as arrays.
ARRAY_ELEMENTS = msgspec.json.Decoder(list[msgspec.Raw])


class StoredDecimal(sa_types.TypeDecorator[PyDecimal]):
    """``numeric(p, s)`` on PostgreSQL; exact decimal text on SQLite, which has no decimal type."""

    impl = Numeric
    cache_ok = True

    def __init__(self, precision: int, scale: int) -> None:
        super().__init__(precision=precision, scale=scale, asdecimal=True)
        self.precision = precision
        self.scale = scale

    def load_dialect_impl(self, dialect: Dialect) -> sa_types.TypeEngine[Any]:
        if dialect.name == "sqlite":
            return dialect.type_descriptor(String())
        return dialect.type_descriptor(Numeric(self.precision, self.scale, asdecimal=True))

    def process_bind_param(self, value: PyDecimal | str | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        # Contract.read_chunk gives a decimal as its exact text.
        number = PyDecimal(value) if isinstance(value, str) else value
        if dialect.name != "sqlite":
            return number
        # Kept as text, a zero would keep the sign it was sent with; PostgreSQL's numeric has none.
        return str((number if number else number.copy_abs()).quantize(PyDecimal(1).scaleb(-self.scale)))

    def process_result_value(self, value: Any, dialect: Dialect) -> PyDecimal | None:
        if value is None:
            return None
        return value if isinstance(value, PyDecimal) else PyDecimal(str(value))


@dataclass(frozen=True)
class Text:
    """A string of at most ``max_length`` characters; ``required`` also refuses null and ``""``."""

    name: str
    max_length: int
    required: bool = False

    def annotation(self) -> Any:
        # The NUL check is a pattern so that pydantic-core runs it, not a Python call per string; it comes
        # after the length checks, so a string both too long and holding NUL reports its length.
        constrained = Annotated[
            str,
            StringConstraints(
                strict=True,
                min_length=1 if self.required else 0,
                max_length=self.max_length,
                pattern=_NO_NUL,
            ),
        ]
        return constrained if self.required else constrained | None

    def fast_field(self, complete: bool) -> tuple[Any, ...]:
        # No NUL check: Contract.plain_records sends every item that could hold a NUL to the model.
        if self.required:
            return (self.name, Annotated[str, msgspec.Meta(min_length=1, max_length=self.max_length)])
        optional = Annotated[str, msgspec.Meta(max_length=self.max_length)] | None
        return (self.name, optional) if complete else (self.name, optional | UnsetType, UNSET)

    def column(self) -> Column[Any]:
        return Column(self.name, String(self.max_length), nullable=not self.required)


@dataclass(frozen=True)
class Decimal:
    """A ``decimal(precision, scale)``: a JSON number or a plain decimal string, read from its exact text."""

    name: str
    precision: int
    scale: int
    _quantum: PyDecimal = field(init=False, repr=False, compare=False)
    _rounding: Context = field(init=False, repr=False, compare=False)
    _int_limit: int = field(init=False, repr=False, compare=False)
    _fits: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def annotation(self) -> Any:
        return Annotated[PyDecimal | None, PlainValidator(self.parse, json_schema_input_type=str | float)]

    def __post_init__(self) -> None:
        # Built once per field: this check runs for every decimal of every item.
        object.__setattr__(self, "_quantum", PyDecimal(1).scaleb(-self.scale))
        # One digit more than the column holds: rounding to the scale can carry into a new digit (999.5 in
        # decimal(3, 0) rounds to 1000), and that must read as a value that does not fit, not raise.
        object.__setattr__(self, "_rounding", Context(prec=self.precision + 1, Emax=MAX_EMAX, Emin=MIN_EMIN))
        integer_digits = self.precision - self.scale
        object.__setattr__(self, "_int_limit", 10**integer_digits)
        # The everyday decimal (`50000000.0`, `12.5`, `-3`, as a JSON number or a string) in a form that
        # fits this column. Its text alone decides that, in one regex, without building a Decimal first;
        # trailing zeros of the fraction do not count. Anything else (exponents, leading zeros or `+`,
        # more digits, no digit after the point) takes the exact path below, which decides it.
        # Possessive repeats: a shorter run of digits never lets the text fit, so the regex need not try one.
        whole = "0" if integer_digits == 0 else f"(?:0|[1-9][0-9]{{0,{integer_digits - 1}}}+)"
        fits = re.compile(rf"-?{whole}(?:\.(?=[0-9])[0-9]{{0,{self.scale}}}+0*+)?")
        object.__setattr__(self, "_fits", fits)

    def parse(self, value: Any) -> PyDecimal | None:
        if value is None:
            return None
        if type(value) is LosslessFloat:
            # A JSON number as the worker reads it: its exact text.
            text = str(value)
            if self._fits.fullmatch(text):
                # PostgreSQL stores it at the column's scale, which drops only trailing zeros.
                return PyDecimal(text)
            number = self._from_json_number(text)
        elif (type(value) is str and self._fits.fullmatch(value)) or (
            type(value) is int and -self._int_limit < value < self._int_limit
        ):
            # A plain decimal string, or an int, that fits: its exact value as it is.
            return PyDecimal(value)
        elif type(value) is PyDecimal:
            number = value
        elif isinstance(value, bool) or not isinstance(value, int | str | PyDecimal):
            raise PydanticCustomError("decimal_type", DECIMAL_TYPE)
        else:
            number = self._from_text_or_int(value)
        if not number.is_finite():
            raise PydanticCustomError("decimal_finite", DECIMAL_NOT_FINITE)
        # Only context-free operations until the number is known to fit: normalize() and friends round to
        # the context's 28 digits (1.000…0001 would pass as 1) and overflow past its exponent range.
        integer_digits = max(number.adjusted() + 1, 0) if number else 0
        if integer_digits > self.precision - self.scale:
            raise self._too_many_integer_digits()
        # Trailing zeros say nothing about size: 10.250 fits decimal(4, 2). Rounding to the scale is exact
        # for such a number, and changes any other. The rounded form is what is stored: the same value,
        # without the thousands of zeros or the exponent it came with.
        exact = number.quantize(self._quantum, context=self._rounding)
        if exact != number:
            raise self._too_many_places()
        return exact

    def _too_many_integer_digits(self) -> PydanticCustomError:
        integer_digits = self.precision - self.scale
        return PydanticCustomError(
            "decimal_integer_digits", f"Field exceeds maximum of {integer_digits} integer digits"
        )

    def _too_many_places(self) -> PydanticCustomError:
        return PydanticCustomError("decimal_places", f"Field exceeds maximum of {self.scale} decimal places")

    def _from_json_number(self, text: str) -> PyDecimal:
        """A JSON number's exact value. Decimal holds exponents of up to about 10**18 either way; a number
        with a larger one is zero, or far too large or too small for any column, and fails as such."""
        try:
            return PyDecimal(text)
        except InvalidOperation:
            pass
        # JSON's grammar leaves only the exponent's size to fail on.
        match = _JSON_NUMBER.fullmatch(text)
        assert match is not None, "a JSON number that Decimal refuses has an exponent"
        sign, whole, fraction, exponent = match.groups("")
        if not (whole + fraction).strip("0"):
            return PyDecimal(sign + "0")
        raise self._too_many_places() if exponent.startswith("-") else self._too_many_integer_digits()

    def fast_field(self, complete: bool) -> tuple[Any, ...]:
        # The value's JSON text, whatever it is: Contract.plain_records checks it against `fits_json`.
        return (self.name, msgspec.Raw) if complete else (self.name, msgspec.Raw | UnsetType, UNSET)

    @property
    def fits_json(self) -> str:
        """The JSON texts the fast path takes for this field: null, or a number or a string holding a
        plain decimal that fits."""
        # Atomic: the three forms start differently, so once one has matched no other can.
        return f'(?>null|{self._fits.pattern}|"{self._fits.pattern}")'

    @staticmethod
    def _from_text_or_int(value: int | str | PyDecimal) -> PyDecimal:
        if isinstance(value, str):
            if value.strip().lower() in _NOT_FINITE:
                raise PydanticCustomError("decimal_finite", DECIMAL_NOT_FINITE)
            if not _PLAIN_DECIMAL.fullmatch(value):
                raise PydanticCustomError("decimal_format", DECIMAL_FORMAT)
        try:
            return PyDecimal(value)
        except InvalidOperation:
            raise PydanticCustomError("decimal_format", DECIMAL_FORMAT) from None

    def column(self) -> Column[Any]:
        return Column(self.name, StoredDecimal(self.precision, self.scale))


@dataclass(frozen=True)
class Choice:
    """A string that must be one of ``values`` (the reference's Y/N flags)."""

    name: str
    values: tuple[str, ...] = ("Y", "N")

    def annotation(self) -> Any:
        return Annotated[str | None, PlainValidator(self.parse, json_schema_input_type=str)]

    def parse(self, value: Any) -> str | None:
        if value is None or (isinstance(value, str) and value in self.values):
            return value
        raise PydanticCustomError("choice", "Value must be one of: " + ", ".join(self.values))

    def fast_field(self, complete: bool) -> tuple[Any, ...]:
        if complete:
            return (self.name, Literal[self.values] | None)
        return (self.name, Literal[self.values] | None | UnsetType, UNSET)

    def column(self) -> Column[Any]:
        width = max(len(v) for v in self.values)
        return Column(self.name, String(width))

    def check(self, table: str) -> CheckConstraint:
        allowed = ", ".join(f"'{v}'" for v in self.values)
        return CheckConstraint(f"{self.name} IN ({allowed})", name=f"ck_{table}_{self.name}")


FieldSpec = Text | Decimal | Choice


def _message(error: Any) -> str:
    """The contract's message for one pydantic error; our own validators already carry theirs."""
    kind = error["type"]
    if kind in ("missing", "string_too_short"):
        return REQUIRED
    if kind == "string_type":
        return REQUIRED if error["input"] is None else MUST_BE_STRING
    if kind == "string_too_long":
        return f"Field exceeds maximum length of {error['ctx']['max_length']} characters"
    if kind == "extra_forbidden":
        return UNKNOWN_FIELD
    if kind == "string_pattern_mismatch":
        return INVALID_CHARACTERS
    return str(error["msg"])


@dataclass
class Contract:
    """One kind of record clientela ingests: its fields, its table and the key unique per tenant."""

    name: str
    table_name: str
    fields: Sequence[FieldSpec]
    key: str
    model: type[BaseModel] = field(init=False)
    table: Table = field(init=False)
    _position: dict[str, int] = field(init=False)
    _key_length: int = field(init=False)
    value_order: list[FieldSpec] = field(init=False)
    _complete: msgspec.json.Decoder[Any] = field(init=False)
    _fast: msgspec.json.Decoder[Any] = field(init=False)
    _fast_decimals: re.Pattern[bytes] = field(init=False)
    _text_values: Callable[[tuple[Any, ...]], tuple[Any, ...]] = field(init=False)
    _decimal_values: Callable[[tuple[Any, ...]], tuple[Any, ...]] = field(init=False)
    _decimals_from: int = field(init=False)
    _key_at: int = field(init=False)
    _absent: list[Any] = field(init=False)
    _keys: msgspec.json.Decoder[Any] = field(init=False)
    _key_from_head: Callable[[Any], Any] = field(init=False)

    def __post_init__(self) -> None:
        definitions: dict[str, Any] = {}
        for spec in self.fields:
            required = isinstance(spec, Text) and spec.required
            definitions[spec.name] = (spec.annotation(), ... if required else None)
        self.model = create_model(
            f"{self.name.title()}Item", __config__=ConfigDict(extra="forbid"), **definitions
        )
        self._position = {spec.name: i for i, spec in enumerate(self.fields)}
        # The decimals last, so that the fast path takes them as one slice of the decoded struct.
        self.value_order = [spec for spec in self.fields if not isinstance(spec, Decimal)] + [
            spec for spec in self.fields if isinstance(spec, Decimal)
        ]
        self._decimals_from = sum(not isinstance(spec, Decimal) for spec in self.fields)
        # Two structs of the same fields: one for an item that gives every field, which is most of them and
        # needs no look for the fields left out, and one for any other.
        self._complete, self._fast = (
            msgspec.json.Decoder(
                msgspec.defstruct(
                    f"{self.name.title()}{kind}",
                    [spec.fast_field(complete) for spec in self.value_order],
                    forbid_unknown_fields=True,
                    kw_only=True,
                )
            )
            for kind, complete in (("Complete", True), ("Fast", False))
        )
        # What the fast path gives for a field the item leaves out: the model's None, or a decimal's JSON
        # null text.
        self._absent = [_JSON_NULL if isinstance(spec, Decimal) else None for spec in self.value_order]
        # An array of items, each read for its key alone: msgspec skips the other keys without building them,
        # and a key that is not a plain value fails the whole read rather than be built.
        head = msgspec.defstruct(
            f"{self.name.title()}Key", [(self.key, str | int | float | bool | None, None)]
        )
        self._keys = msgspec.json.Decoder(list[head])  # type: ignore[valid-type]
        self._key_from_head = operator.attrgetter(self.key)
        self._fast_decimals = re.compile(
            "\t".join(spec.fits_json for spec in self.value_order if isinstance(spec, Decimal)).encode()
        )
        self._text_values = operator.itemgetter(slice(None, self._decimals_from))
        self._decimal_values = operator.itemgetter(slice(self._decimals_from, None))
        self._key_at = self.value_names.index(self.key)
        (key_spec,) = [spec for spec in self.fields if spec.name == self.key]
        assert isinstance(key_spec, Text), "the key of a contract is a text field"
        self._key_length = key_spec.max_length
        checks = [spec.check(self.table_name) for spec in self.fields if isinstance(spec, Choice)]
        self.table = Table(
            self.table_name,
            Base.metadata,
            Column("id", Uuid, primary_key=True, default=uuid.uuid4),
            # No foreign key on PostgreSQL, for the cost of its per-row check (see migration 0003).
            Column("tenant_id", Uuid, nullable=False),
            Column("batch_id", Uuid, nullable=False),
            # The start of the transaction that stored the record, unless given.
            Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
            *(spec.column() for spec in self.fields),
            UniqueConstraint("tenant_id", self.key, name=f"uq_{self.table_name}_tenant_{self.key}"),
            *checks,
        )

    @property
    def field_names(self) -> list[str]:
        return [spec.name for spec in self.fields]

    @property
    def value_names(self) -> list[str]:
        """The fields in the order ``read_chunk`` gives their values: the table's order, the decimals last."""
        return [spec.name for spec in self.value_order]

    @property
    def has_decimals(self) -> bool:
        return self._decimals_from < len(self.value_order)

    @property
    def key_position(self) -> int:
        """Where the key is among the values ``read_chunk`` gives."""
        return self._key_at

    def validate(self, item: Any) -> tuple[dict[str, Any] | None, ItemErrors]:
        """The item's stored values, or its errors: one per failing field, table order, unknown keys last."""
        if not isinstance(item, dict):
            return None, [{"message": ITEM_MUST_BE_OBJECT}]
        try:
            return self.model.model_validate(item).__dict__, []
        except ValidationError as exc:
            errors = [
                {"field": str(error["loc"][0]), "message": _message(error)}
                for error in exc.errors(include_url=False)
            ]
            return None, self.ordered(errors)

    def read_chunk(
        self, elements: Sequence[bytes], *, escapes: bool
    ) -> tuple[Records, dict[int, ItemErrors]]:
        """A chunk's items, from their JSON texts: the valid ones as ``Records``, and the errors of each
        other one by its position. ``escapes`` says whether an element may hold a JSON escape (a
        backslash)."""
        records = self.plain_records(elements, escapes=escapes)
        errors: dict[int, ItemErrors] = {}
        for position in sorted(set(range(len(elements))).difference(records.positions)):
            values, item_errors = self._model_read(elements[position])
            if values is None:
                errors[position] = item_errors
            else:
                records.add(position, values, self._decimals_from)
        return records, errors

    def _model_read(self, element: bytes) -> tuple[list[Any] | None, ItemErrors]:
        """One item as the model reads it: its values in ``value_names`` order (decimals as their exact
        text), or its errors."""
        item = jiter.from_json(element, float_mode="lossless-float")
        validated, errors = self.validate(item)
        repeated = [key for key in _repeated_keys(element, item) if key in self._position]
        if repeated:
            # Each repeated field fails for its repetition alone; its last value, which the item holds, is
            # not worth a message of its own.
            errors = [error for error in errors if error.get("field") not in repeated]
            errors += [{"field": key, "message": REPEATED} for key in repeated]
            return None, self.ordered(errors)
        if validated is None:
            return None, errors
        values = [validated[spec.name] for spec in self.value_order]
        for i in range(self._decimals_from, len(values)):
            if values[i] is not None:
                # str() of a Decimal is exact; PostgreSQL also reads its exponent form.
                values[i] = str(values[i])
        return values, []

    def plain_records(self, elements: Sequence[bytes], *, escapes: bool) -> Records:
        """The plainly valid items of a chunk, read all at once; the others are left to the model.
        ``escapes`` says whether an element may hold a JSON escape (a backslash).

        Most items are plainly valid, and for them the model costs more than the rest of the pipeline:
        32 fields, eight of them decimals checked in Python. So msgspec decodes each text straight into a
        struct typed from the same field table, each decimal kept as its JSON text, and one regex checks an
        item's decimals at once. This path takes only items the model accepts, and keeps the values the
        model keeps; an error, an exponent or a string that might hold NUL is left to the model, which
        has every message. Every step after the decoding runs over the whole chunk in C (map, compress,
        one join), not as Python code per item: per item, that code cost more than the decoding.
        """
        complete = self._complete.decode
        structs: list[Any] = []
        for element in elements:
            try:
                structs.append(complete(element))
            except msgspec.ValidationError:
                structs.append(None)
        # An item that leaves a field out, or has an error.
        partial = set(compress(range(len(structs)), map(operator.is_, structs, repeat(None))))
        for position in partial:
            with contextlib.suppress(msgspec.ValidationError):
                structs[position] = self._fast.decode(elements[position])
        if escapes:
            for position, element in enumerate(elements):
                if _NUL_ESCAPE in element:
                    structs[position] = None
        positions = list(compress(range(len(structs)), map(operator.is_not, structs, repeat(None))))
        values = list(map(msgspec.structs.astuple, map(structs.__getitem__, positions)))
        width = len(self.value_order)
        present = [width] * len(values)
        for k in compress(range(len(positions)), map(partial.__contains__, positions)):
            present[k] -= values[k].count(UNSET)
            values[k] = tuple(
                blank if value is UNSET else value
                for value, blank in zip(values[k], self._absent, strict=True)
            )
        keep = [True] * len(values)
        # A text's ':' are as many as its keys unless a key is repeated or a string holds one.
        colons = list(map(bytes.count, map(elements.__getitem__, positions), repeat(b":")))
        for k in compress(range(len(values)), map(operator.ne, colons, present)):
            keep[k] = _keys_once(elements[positions[k]], values[k], present[k], colons[k])
        decimals = list(map(b"\t".join, map(self._decimal_values, values)))
        for k in compress(
            range(len(values)), map(operator.not_, map(self._fast_decimals.fullmatch, decimals))
        ):
            keep[k] = False
        if not all(keep):
            positions = list(compress(positions, keep))
            values = list(compress(values, keep))
            decimals = list(compress(decimals, keep))
        # Each decimal is now known to be null, a number, or a string holding a number: its text is what is
        # left without the quotes, and null is COPY's.
        joined = b"\n".join(decimals).decode().replace('"', "").replace("null", COPY_NULL)
        return Records(
            positions, list(map(self._text_values, values)), joined.split("\n") if positions else []
        )

    def ordered(self, errors: ItemErrors) -> ItemErrors:
        """Errors in field-table order; unknown keys keep their input order after the table's fields."""
        last = len(self.fields)
        return sorted(errors, key=lambda e: self._position.get(e.get("field", ""), last))

    def keys_of(self, body: bytes) -> list[str | None] | None:
        """The key of each element of a JSON array, as ``key_of`` gives it, read without building the
        elements; None when an element is not an object or its key is not a plain value."""
        try:
            heads = self._keys.decode(body)
        except (msgspec.DecodeError, RecursionError):
            return None
        return self._accepted_keys(map(self._key_from_head, heads))

    def key_of(self, item: Any) -> str | None:
        """The item's uniqueness key when the key field could accept it; the receiver uses it for duplicate
        facts and the worker stores it with the item's result.

        A key the field refuses anyway (too long, or holding NUL, which PostgreSQL text cannot store and
        which would fail the whole chunk) is no key: such an item fails on its key whatever else it repeats.
        """
        return self._accepted_keys([item.get(self.key)])[0] if isinstance(item, dict) else None

    def _accepted_keys(self, values: Iterable[Any]) -> list[str | None]:
        # One comprehension, not a call per key: a 10,000-item body would spend 10 ms on the calls alone.
        length = self._key_length
        return [
            value if type(value) is str and 0 < len(value) <= length and "\x00" not in value else None
            for value in values
        ]


@dataclass
class Records:
    """A chunk's valid items, as the COPY writes them: for each, its position in the chunk, its values up
    to the decimals (``Contract.value_names`` order, None for null), and its decimals as one text in the
    text format of COPY (a tab between values, ``\\N`` for null; empty for a contract without decimals).
    """

    positions: list[int]
    texts: list[tuple[str | None, ...]]
    decimals: list[str]

    def __len__(self) -> int:
        return len(self.positions)

    def add(self, position: int, values: Sequence[Any], split: int) -> None:
        """One more item, from its values in ``value_names`` order (decimals as text or None); ``split``
        is where its decimals start."""
        self.positions.append(position)
        self.texts.append(tuple(values[:split]))
        self.decimals.append("\t".join([COPY_NULL if value is None else value for value in values[split:]]))

    def values(self, k: int) -> list[Any]:
        """The ``k``-th item's values in ``value_names`` order, decimals as their text or None."""
        decimals = self.decimals[k].split("\t") if self.decimals[k] else []
        return [*self.texts[k], *(None if text == COPY_NULL else text for text in decimals)]

    def keys(self, at: int) -> list[str]:
        """Each item's value at ``at`` (a text field's place among the values)."""
        return list(map(operator.itemgetter(at), self.texts))

    def without(self, positions: set[int]) -> Records:
        """These records but the ones at ``positions``."""
        keep = [position not in positions for position in self.positions]
        return Records(
            list(compress(self.positions, keep)),
            list(compress(self.texts, keep)),
            list(compress(self.decimals, keep)),
        )


def _keys_once(element: bytes, values: Sequence[Any], present: int, colons: int) -> bool:
    """Whether no key of the fast struct's ``element`` was given twice: msgspec keeps a repeated key's last
    value without a word.

    Every ':' of the text ends a key or lies inside a string. A struct field holds one key, so when the
    text's ':' are as many as the keys present plus the ':' in the decoded strings, no ':' is left for a
    repeated key (whose earlier value, and its ':', the struct lost). An escaped ':' (``\\u003a``) would
    count in the strings but not in the text, so such an element is never said to pass. ``colons`` are the
    text's.
    """
    if colons == present:
        return True
    if b"\\u003a" in element or b"\\u003A" in element:
        return False
    return colons == present + sum(value.count(":") for value in values if type(value) is str)


def _repeated_keys(element: bytes, item: Any) -> list[str]:
    """The keys ``element``'s object gives more than once, in the order they first appear."""
    if type(item) is not dict or element.count(b":") == len(item):
        # Every ':' ended a distinct key.
        return []
    pairs = json.loads(element, object_pairs_hook=list)
    counts = Counter(key for key, _ in pairs)
    return [key for key, count in counts.items() if count > 1]
