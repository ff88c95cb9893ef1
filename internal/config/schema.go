package config

import (
	"fmt"
	"maps"
	"reflect"
	"slices"
	"strings"
	"time"

	"github.com/BurntSushi/toml"
)

var (
	durationType = reflect.TypeFor[Duration]()
	timeoutType  = reflect.TypeFor[Timeout]()
	configType   = reflect.TypeFor[Config]()
)

// checkSchema compares the generically decoded file with the Go types and
// reports every value of the wrong type, and every key that matches a known
// key only when letter case is ignored (the TOML decoder would quietly
// accept "Max_Builders"). It deletes what it reports from raw, so that the
// rest decodes. Unknown keys are left for the decoder's Undecoded.
func checkSchema(raw map[string]any) Problems {
	var s schemaChecker
	s.table(raw, configType, "", "")
	return s.problems
}

type schemaChecker struct {
	problems Problems
}

// add reports a problem, clipping text from the file as validator.add does.
func (s *schemaChecker) add(key, format string, args ...any) {
	s.problems = append(s.problems, Problem{Key: clip(key, maxMessage), Message: clip(fmt.Sprintf(format, clipArgs(args)...), maxMessage)})
}

func joinKey(prefix, key string) string {
	k := toml.Key{key}.String()
	if prefix == "" {
		return k
	}
	return prefix + "." + k
}

// table checks a TOML table against struct type t, field by field in the
// struct's order. key names the table in problems ("pool[0] (name \"x\")")
// and header is its TOML table name ("pool").
func (s *schemaChecker) table(raw map[string]any, t reflect.Type, key, header string) {
	known := map[string]bool{}
	for i := range t.NumField() {
		f := t.Field(i)
		name, _, _ := strings.Cut(f.Tag.Get("toml"), ",")
		known[name] = true
		v, ok := raw[name]
		if !ok {
			continue
		}
		if !s.value(v, f.Type, joinKey(key, name), joinKey(header, name), name) {
			delete(raw, name)
		}
	}
	// The TOML decoder matches keys without regard to case; be strict.
	for _, name := range slices.Sorted(maps.Keys(raw)) {
		if known[name] {
			continue
		}
		for tag := range known {
			if strings.EqualFold(tag, name) {
				s.add(joinKey(key, name), "%s (did you mean %s? keys are lower case)", unknownKeyMessage, tag)
				delete(raw, name)
				break
			}
		}
	}
}

// value checks one value against the Go type it decodes into and reports
// whether it may stay.
func (s *schemaChecker) value(v any, t reflect.Type, key, header, name string) bool {
	if t.Kind() == reflect.Pointer { // an optional value: *int is an int when present
		t = t.Elem()
	}
	switch {
	case t == durationType:
		if _, ok := v.(string); !ok {
			s.add(key, "must be a duration in quotes, like %s = \"5m\"; got %s", name, describe(v))
			return false
		}
	case t == timeoutType:
		if _, ok := v.(string); !ok {
			s.add(key, "must be \"auto\" or a duration in quotes, like %s = \"5m\"; got %s", name, describe(v))
			return false
		}
	case t.Kind() == reflect.String:
		if _, ok := v.(string); !ok {
			s.add(key, "must be a string in double quotes; got %s", describe(v))
			return false
		}
	case t.Kind() == reflect.Int:
		if _, ok := v.(int64); !ok {
			example := "1"
			if str, isStr := v.(string); isStr {
				example = str
			}
			s.add(key, "must be a whole number without quotes, like %s = %s; got %s", name, example, describe(v))
			return false
		}
	case t.Kind() == reflect.Slice && t.Elem().Kind() == reflect.String:
		return s.stringList(v, key, name)
	case t.Kind() == reflect.Struct:
		m, ok := v.(map[string]any)
		if !ok {
			s.add(key, "must be a table, written [%s] or %s = { ... }; got %s", header, name, describe(v))
			return false
		}
		s.table(m, t, key, header)
	case t.Kind() == reflect.Slice && t.Elem().Kind() == reflect.Struct:
		var pools []map[string]any
		switch list := v.(type) {
		case []map[string]any:
			pools = list
		case []any:
			for _, e := range list {
				m, ok := e.(map[string]any)
				if !ok {
					s.add(key, "must be tables written [[%s]]; got a list holding %s", name, describe(e))
					return false
				}
				pools = append(pools, m)
			}
		case map[string]any:
			s.add(key, "must be written [[%s]] (double brackets), one per %s; got a single [%s] table", name, name, name)
			return false
		default:
			s.add(key, "must be tables written [[%s]]; got %s", name, describe(v))
			return false
		}
		for i, m := range pools {
			s.table(m, t.Elem(), poolKey(i, rawName(m)), header)
		}
	}
	return true
}

// shown is text describe made, with any value in it clipped already.
type shown string

// describe names a TOML value's type, with (the start of) the value.
func describe(v any) shown {
	return shown(describeText(v))
}

func describeText(v any) string {
	switch v := v.(type) {
	case string:
		return fmt.Sprintf("the string %q", Clip(v))
	case int64:
		return fmt.Sprintf("the integer %d", v)
	case float64:
		return fmt.Sprintf("the number %v", v)
	case bool:
		return fmt.Sprintf("%v", v)
	case []any, []map[string]any:
		return "a list"
	case map[string]any:
		return "a table"
	case time.Time:
		return "a date or time"
	}
	return fmt.Sprintf("a %T", v)
}

// stringList checks a value that decodes into a list of strings.
func (s *schemaChecker) stringList(v any, key, name string) bool {
	list, ok := v.([]any)
	if !ok {
		if str, isStr := v.(string); isStr {
			s.add(key, "must be a list of strings; write %s = [%q]", name, str)
		} else {
			s.add(key, "must be a list of strings, like %s = [\"a\", \"b\"]; got %s", name, describe(v))
		}
		return false
	}
	good := true
	for i, e := range list {
		if _, ok := e.(string); !ok {
			s.add(fmt.Sprintf("%s[%d]", key, i), "must be a string in double quotes; got %s", describe(e))
			good = false
		}
	}
	return good
}
