"""JSON schemas for the validity tests: each feature a constraint engine must get right, alone and mixed.
Nested objects, arrays with min/max items, enum and const, string patterns, lengths and formats, numeric
bounds, anyOf/oneOf/allOf, $ref/$defs (recursive too), additionalProperties false, required fields."""

from __future__ import annotations


def _obj(properties: dict, required: list[str] | None = None, closed: bool = True) -> dict:
    schema = {"type": "object", "properties": properties,
              "required": list(properties) if required is None else required}
    if closed:
        schema["additionalProperties"] = False
    return schema


POINT = _obj({"x": {"type": "integer"}, "y": {"type": "integer"}})

SCHEMAS: dict[str, dict] = {
    # scalars
    "string": {"type": "string"},
    "integer": {"type": "integer"},
    "number": {"type": "number"},
    "boolean": {"type": "boolean"},
    "null": {"type": "null"},
    "type-list": {"type": ["integer", "string", "null"]},
    # numeric bounds
    "int-range": {"type": "integer", "minimum": -20, "maximum": 35},
    "int-exclusive": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 10},
    "int-multiple": {"type": "integer", "multipleOf": 7, "minimum": 0, "maximum": 1000},
    "number-range": {"type": "number", "minimum": 0.5, "maximum": 3.25},
    "number-exclusive": {"type": "number", "exclusiveMinimum": -1, "exclusiveMaximum": 1},
    "number-negative": {"type": "number", "maximum": -100},
    # strings
    "string-length": {"type": "string", "minLength": 3, "maxLength": 6},
    "string-pattern": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{3}$"},
    "string-pattern-alt": {"type": "string", "pattern": "^(red|green|blue)-[a-f0-9]{2,4}$"},
    "format-uuid": {"type": "string", "format": "uuid"},
    "format-ipv4": {"type": "string", "format": "ipv4"},
    "format-email": {"type": "string", "format": "email"},
    "format-date": {"type": "string", "format": "date"},
    "format-date-time": {"type": "string", "format": "date-time"},
    # enum and const
    "enum-strings": {"enum": ["north", "south", "east", "west"]},
    "enum-mixed": {"enum": [1, "one", None, True, 2.5]},
    "const-string": {"const": "fixed"},
    "const-object": {"const": {"a": 1, "b": [True, None]}},
    # objects
    "object-flat": _obj({"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0,
                                                                              "maximum": 150}}),
    "object-optional": _obj({"id": {"type": "integer"}, "note": {"type": "string"}, "flag": {"type": "boolean"}},
                            required=["id"]),
    "object-open": _obj({"id": {"type": "integer"}}, closed=False),
    "object-empty-closed": {"type": "object", "additionalProperties": False},
    "object-typed-extra": {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0},
                           "maxProperties": 3},
    "object-min-properties": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                              "minProperties": 1, "additionalProperties": False},
    "object-pattern-properties": {"type": "object", "patternProperties": {"^x_[a-z]+$": {"type": "boolean"}},
                                  "additionalProperties": False},
    "object-nested": _obj({"user": _obj({"name": {"type": "string"}, "address": _obj({
        "city": {"type": "string", "maxLength": 15}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}})}),
        "active": {"type": "boolean"}}),
    "object-deep": _obj({"a": _obj({"b": _obj({"c": _obj({"d": {"enum": ["x", "y"]}})})})}),
    # arrays
    "array-ints": {"type": "array", "items": {"type": "integer"}},
    "array-bounded": {"type": "array", "items": {"type": "string", "maxLength": 5}, "minItems": 2, "maxItems": 4},
    "array-exact": {"type": "array", "items": {"type": "boolean"}, "minItems": 3, "maxItems": 3},
    "array-empty": {"type": "array", "maxItems": 0},
    "array-of-objects": {"type": "array", "items": POINT, "minItems": 1, "maxItems": 3},
    "array-nested": {"type": "array", "items": {"type": "array", "items": {"type": "integer", "minimum": 0,
                                                                          "maximum": 9},
                                               "maxItems": 3}, "maxItems": 3},
    "array-prefix": {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}, {"const": True}],
                     "items": False},
    # combinators
    "anyof-scalars": {"anyOf": [{"type": "integer"}, {"type": "string", "maxLength": 4}]},
    "anyof-objects": {"anyOf": [_obj({"kind": {"const": "circle"}, "r": {"type": "number", "minimum": 0}}),
                                _obj({"kind": {"const": "square"}, "side": {"type": "integer", "minimum": 1}})]},
    "oneof-disjoint": {"oneOf": [{"type": "boolean"}, {"type": "null"}, _obj({"v": {"type": "integer"}})]},
    "oneof-const": {"oneOf": [{"const": "a"}, {"const": "b"}, {"const": 3}]},
    "allof-merge": {"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
                              {"properties": {"b": {"type": "string", "maxLength": 3}}, "required": ["b"]}]},
    "nullable-object": {"anyOf": [{"type": "null"}, POINT]},
    # references
    "ref-defs": {"$defs": {"point": POINT}, **_obj({"from": {"$ref": "#/$defs/point"},
                                                    "to": {"$ref": "#/$defs/point"}})},
    "ref-definitions": {"definitions": {"color": {"enum": ["red", "green"]}},
                        **_obj({"fg": {"$ref": "#/definitions/color"}, "bg": {"$ref": "#/definitions/color"}})},
    "ref-recursive": {"$defs": {"node": _obj({"value": {"type": "integer", "minimum": 0, "maximum": 99},
                                              "children": {"type": "array", "items": {"$ref": "#/$defs/node"},
                                                           "maxItems": 2}}, required=["value"])},
                      "$ref": "#/$defs/node"},
    "ref-chain": {"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"type": "array", "items": {"$ref": "#/$defs/c"},
                                                              "maxItems": 2},
                            "c": {"enum": [1, 2, 3]}}, **_obj({"list": {"$ref": "#/$defs/a"}})},
    # mixed, as an application would send
    "mixed-order": _obj({"order_id": {"type": "string", "pattern": "^ORD-[0-9]{4}$"},
                         "items": {"type": "array", "minItems": 1, "maxItems": 3, "items": _obj({
                             "sku": {"type": "string", "maxLength": 8},
                             "qty": {"type": "integer", "minimum": 1, "maximum": 10},
                             "price": {"type": "number", "minimum": 0, "maximum": 1000}})},
                         "status": {"enum": ["new", "paid", "shipped"]}, "gift": {"type": "boolean"}}),
    "mixed-event": _obj({"name": {"type": "string", "minLength": 1, "maxLength": 20},
                         "when": {"type": "string", "format": "date"},
                         "attendees": {"type": "array", "items": {"type": "string", "format": "email"},
                                       "maxItems": 2},
                         "location": {"anyOf": [{"type": "null"}, _obj({"lat": {"type": "number", "minimum": -90,
                                                                                "maximum": 90},
                                                                        "lon": {"type": "number", "minimum": -180,
                                                                                "maximum": 180}})]}},
                        required=["name", "when"]),
    "mixed-config": _obj({"version": {"const": 2}, "debug": {"type": "boolean"},
                          "retries": {"type": "integer", "minimum": 0, "maximum": 5},
                          "mode": {"enum": ["fast", "safe"]},
                          "tags": {"type": "array", "items": {"type": "string", "pattern": "^[a-z]{1,6}$"},
                                   "maxItems": 4},
                          "limits": {"type": "object", "additionalProperties": {"type": "number"},
                                     "maxProperties": 2}},
                         required=["version", "mode"]),
    "mixed-pydantic-like": {"$defs": {"Pet": {"properties": {"name": {"title": "Name", "type": "string"},
                                                             "species": {"enum": ["cat", "dog"], "title": "Species",
                                                                         "type": "string"}},
                                              "required": ["name", "species"], "title": "Pet", "type": "object",
                                              "additionalProperties": False}},
                            "properties": {"owner": {"title": "Owner", "type": "string"},
                                           "pets": {"items": {"$ref": "#/$defs/Pet"}, "title": "Pets",
                                                    "type": "array", "maxItems": 2}},
                            "required": ["owner", "pets"], "title": "Household", "type": "object",
                            "additionalProperties": False},
}
