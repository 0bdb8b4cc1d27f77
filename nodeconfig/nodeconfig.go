// Package nodeconfig edits containerd's config file so that containerd uses
// streamer-snapshotter (a proxy plugin and the CRI snapshotter), records
// every key it set, and undoes exactly that record.
//
// The file is decoded into a map, changed and encoded again: every setting
// is kept, but comments and formatting are not (TOML libraries that keep
// comments do not round-trip containerd's quoted plugin keys reliably).
// Callers keep a byte-for-byte backup for that reason.
package nodeconfig

import (
	"bytes"
	"errors"
	"fmt"
	"reflect"
	"slices"
	"strings"

	"github.com/pelletier/go-toml/v2"
)

// DefaultName is the name containerd gives the snapshotter: the key under
// proxy_plugins and the CRI snapshotter value.
const DefaultName = "streamer"

// Config schema versions containerd reads.
const (
	// Version2 is the schema of containerd 1.5 to 1.7 (and still read by 2.x).
	Version2 = 2
	// Version3 is the schema of containerd 2.x.
	Version3 = 3
)

// ErrUnsupportedVersion: the file's schema is one this package does not
// edit (version 1, or unknown).
var ErrUnsupportedVersion = errors.New("unsupported containerd config version")

// Options says what the snapshotter is called and where it listens.
type Options struct {
	// Name of the proxy plugin and CRI snapshotter; default DefaultName.
	Name string
	// Address is the snapshotter's unix socket (its config's address).
	Address string
}

func (o Options) name() string {
	if o.Name == "" {
		return DefaultName
	}
	return o.Name
}

// Change is one key Apply set: where, what was there before, and what it
// wrote. Values are strings or booleans (the only kinds Apply writes), so a
// Change survives a JSON round trip unchanged.
type Change struct {
	Key     []string `json:"key"`
	Existed bool     `json:"existed"`
	Old     any      `json:"old,omitempty"`
	New     any      `json:"new"`
}

// Record is everything Apply changed in one file, for Revert.
type Record struct {
	// CreatedFile: the file was absent (or empty) and Apply wrote it whole.
	CreatedFile bool `json:"created_file,omitempty"`
	// Version is the schema version of the file Apply edited.
	Version int64 `json:"version"`
	// Changes in the order they were made.
	Changes []Change `json:"changes,omitempty"`
	// CreatedTables are the tables Apply created, parents first.
	CreatedTables [][]string `json:"created_tables,omitempty"`
}

// Merge appends the changes of a later Apply, keeping the earliest old
// value of each key: reverting the merged record restores the state before
// the first Apply.
func (r Record) Merge(later Record) Record {
	out := r
	out.Changes = append([]Change(nil), r.Changes...)
	out.CreatedTables = append([][]string(nil), r.CreatedTables...)
	for _, c := range later.Changes {
		if i := findChange(out.Changes, c.Key); i >= 0 {
			out.Changes[i].New = c.New
			continue
		}
		out.Changes = append(out.Changes, c)
	}
	out.CreatedTables = append(out.CreatedTables, later.CreatedTables...)
	return out
}

func findChange(cs []Change, key []string) int {
	for i, c := range cs {
		if slices.Equal(c.Key, key) {
			return i
		}
	}
	return -1
}

// Keys returns the keys the snapshotter needs for a file of this version,
// with their values, in the order Apply sets them.
func Keys(version int64, opts Options) ([]Change, error) {
	name := opts.name()
	if opts.Address == "" {
		return nil, errors.New("snapshotter address must be set")
	}
	keys := []Change{
		{Key: []string{"proxy_plugins", name, "type"}, New: "snapshot"},
		{Key: []string{"proxy_plugins", name, "address"}, New: opts.Address},
	}
	cri, err := criImagesTable(version)
	if err != nil {
		return nil, err
	}
	keys = append(keys,
		Change{Key: append(cri, "snapshotter"), New: name},
		Change{Key: append(cri, "disable_snapshot_annotations"), New: false},
	)
	return keys, nil
}

// criImagesTable is the table holding the CRI snapshotter settings.
func criImagesTable(version int64) ([]string, error) {
	switch version {
	case Version2:
		return []string{"plugins", "io.containerd.grpc.v1.cri", "containerd"}, nil
	case Version3:
		return []string{"plugins", "io.containerd.cri.v1.images"}, nil
	}
	return nil, fmt.Errorf("version %d: %w (only 2 and 3 are edited; a file without version is version 1: add `version = 2` and rename its plugin sections, or run `containerd config migrate` with containerd 2)", version, ErrUnsupportedVersion)
}

// Decode parses a containerd config. An empty document (nothing but blank
// lines and comments) decodes to an empty map.
func Decode(src []byte) (map[string]any, error) {
	doc := map[string]any{}
	if err := toml.Unmarshal(src, &doc); err != nil {
		return nil, fmt.Errorf("parse containerd config: %w", err)
	}
	return doc, nil
}

// Version is the document's schema version: its version key, or 1 when
// absent (as containerd reads it).
func Version(doc map[string]any) (int64, error) {
	v, ok := doc["version"]
	if !ok {
		return 1, nil
	}
	n, ok := v.(int64)
	if !ok {
		return 0, fmt.Errorf("containerd config: version is %T, want an integer", v)
	}
	return n, nil
}

// Encode writes doc as TOML, tables indented.
func Encode(doc map[string]any) ([]byte, error) {
	var b bytes.Buffer
	enc := toml.NewEncoder(&b).SetIndentTables(true)
	if err := enc.Encode(doc); err != nil {
		return nil, fmt.Errorf("encode containerd config: %w", err)
	}
	return b.Bytes(), nil
}

// Apply sets the keys containerd needs to use the snapshotter in src (a
// containerd config; empty or nil means an absent file, which becomes a
// version 2 file). When every key already has its value, Apply returns src
// itself and an empty record: running it twice changes nothing.
func Apply(src []byte, opts Options) ([]byte, Record, error) {
	doc, err := Decode(src)
	if err != nil {
		return nil, Record{}, err
	}
	var rec Record
	if len(doc) == 0 {
		rec.CreatedFile = true
		doc["version"] = int64(Version2)
	}
	version, err := Version(doc)
	if err != nil {
		return nil, Record{}, err
	}
	rec.Version = version
	keys, err := Keys(version, opts)
	if err != nil {
		return nil, Record{}, err
	}
	for _, k := range keys {
		old, existed, err := lookup(doc, k.Key)
		if err != nil {
			return nil, Record{}, err
		}
		if existed && reflect.DeepEqual(old, k.New) {
			continue
		}
		if existed {
			switch old.(type) {
			case string, bool:
			default:
				return nil, Record{}, fmt.Errorf("containerd config: %s is a %T, want a %T", keyString(k.Key), old, k.New)
			}
		}
		created, err := set(doc, k.Key, k.New)
		if err != nil {
			return nil, Record{}, err
		}
		rec.CreatedTables = append(rec.CreatedTables, created...)
		rec.Changes = append(rec.Changes, Change{Key: k.Key, Existed: existed, Old: old, New: k.New})
	}
	if len(rec.Changes) == 0 && !rec.CreatedFile {
		return src, Record{Version: version}, nil
	}
	out, err := Encode(doc)
	if err != nil {
		return nil, Record{}, err
	}
	return out, rec, nil
}

// Revert undoes rec in src: each key still holding the value Apply wrote
// gets its old value back, or is deleted if Apply added it; tables Apply
// created are deleted when empty. A key changed since Apply is left alone
// and reported in warnings. When rec.CreatedFile and nothing but the version
// remains, out is nil: the file should be removed.
func Revert(src []byte, rec Record) (out []byte, warnings []string, err error) {
	doc, err := Decode(src)
	if err != nil {
		return nil, nil, err
	}
	changed := false
	for i := len(rec.Changes) - 1; i >= 0; i-- {
		c := rec.Changes[i]
		cur, ok, err := lookup(doc, c.Key)
		if err != nil {
			return nil, nil, err
		}
		if !ok || !reflect.DeepEqual(cur, c.New) {
			warnings = append(warnings, fmt.Sprintf("%s was changed since install (now %s), left as is", keyString(c.Key), describe(cur, ok)))
			continue
		}
		if c.Existed {
			if _, err := set(doc, c.Key, c.Old); err != nil {
				return nil, nil, err
			}
		} else {
			del(doc, c.Key)
		}
		changed = true
	}
	for i := len(rec.CreatedTables) - 1; i >= 0; i-- {
		path := rec.CreatedTables[i]
		if t, ok, _ := lookup(doc, path); ok {
			if m, isMap := t.(map[string]any); isMap && len(m) == 0 {
				del(doc, path)
				changed = true
			}
		}
	}
	if rec.CreatedFile {
		if _, hasVersion := doc["version"]; len(doc) == 0 || (len(doc) == 1 && hasVersion) {
			return nil, warnings, nil
		}
	}
	if !changed {
		return src, warnings, nil
	}
	out, err = Encode(doc)
	return out, warnings, err
}

// Status is what a containerd config says about the snapshotter.
type Status struct {
	// Version is the schema version (1 when the file has none).
	Version int64
	// PluginType and PluginAddress are proxy_plugins.<name>'s; empty when
	// absent.
	PluginType, PluginAddress string
	// Snapshotter is the CRI snapshotter; empty when unset (containerd's
	// default, overlayfs).
	Snapshotter string
	// AnnotationsEnabled: disable_snapshot_annotations is explicitly false
	// (its default is true).
	AnnotationsEnabled bool
}

// Inspect reads what src configures for the snapshotter called name.
func Inspect(src []byte, name string) (Status, error) {
	if name == "" {
		name = DefaultName
	}
	doc, err := Decode(src)
	if err != nil {
		return Status{}, err
	}
	var st Status
	if st.Version, err = Version(doc); err != nil {
		return st, err
	}
	str := func(path ...string) string {
		v, _, _ := lookup(doc, path)
		s, _ := v.(string)
		return s
	}
	st.PluginType = str("proxy_plugins", name, "type")
	st.PluginAddress = str("proxy_plugins", name, "address")
	cri, err := criImagesTable(st.Version)
	if err != nil {
		return st, err
	}
	st.Snapshotter = str(append(cri, "snapshotter")...)
	v, ok, _ := lookup(doc, append(cri, "disable_snapshot_annotations"))
	st.AnnotationsEnabled = ok && v == false
	return st, nil
}

// lookup returns the value at path; a non-table on the way is an error.
func lookup(doc map[string]any, path []string) (any, bool, error) {
	cur := doc
	for i, k := range path {
		v, ok := cur[k]
		if !ok {
			return nil, false, nil
		}
		if i == len(path)-1 {
			return v, true, nil
		}
		m, ok := v.(map[string]any)
		if !ok {
			return nil, false, fmt.Errorf("containerd config: %s is a %T, want a table", keyString(path[:i+1]), v)
		}
		cur = m
	}
	return doc, true, nil
}

// set stores v at path, creating missing tables; it returns the paths of
// the tables it created, parents first.
func set(doc map[string]any, path []string, v any) ([][]string, error) {
	var created [][]string
	cur := doc
	for i, k := range path[:len(path)-1] {
		next, ok := cur[k]
		if !ok {
			m := map[string]any{}
			cur[k] = m
			created = append(created, append([]string(nil), path[:i+1]...))
			cur = m
			continue
		}
		m, ok := next.(map[string]any)
		if !ok {
			return nil, fmt.Errorf("containerd config: %s is a %T, want a table", keyString(path[:i+1]), next)
		}
		cur = m
	}
	cur[path[len(path)-1]] = v
	return created, nil
}

func del(doc map[string]any, path []string) {
	cur := doc
	for _, k := range path[:len(path)-1] {
		m, ok := cur[k].(map[string]any)
		if !ok {
			return
		}
		cur = m
	}
	delete(cur, path[len(path)-1])
}

func describe(v any, ok bool) string {
	if !ok {
		return "absent"
	}
	return fmt.Sprintf("%#v", v)
}

// keyString writes a key path as TOML does: plugins."io.containerd.grpc.v1.cri".
func keyString(path []string) string {
	parts := make([]string, len(path))
	for i, k := range path {
		if strings.ContainsAny(k, ". \"'") || k == "" {
			parts[i] = fmt.Sprintf("%q", k)
		} else {
			parts[i] = k
		}
	}
	return strings.Join(parts, ".")
}

// KeyString is the TOML spelling of a key path, for messages.
func KeyString(path []string) string { return keyString(path) }
