package service

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"time"

	bolt "go.etcd.io/bbolt"
)

// Bucket names. operations: id -> Operation JSON; images: "host/repo@digest"
// -> id of the image's newest operation; repositories: "host/repo" ->
// Repository JSON.
var (
	bucketOperations   = []byte("operations")
	bucketImages       = []byte("images")
	bucketRepositories = []byte("repositories")
)

// Store keeps operations and repository settings in a bbolt database.
//
// bbolt because it is pure Go (no cgo, the binary stays static), embedded
// (no server to run next to the service), transactional with fsync on
// commit (a kill -9 loses nothing committed) and its single writer is no
// limit: writes are a few per operation.
type Store struct {
	db *bolt.DB
}

// OpenStore opens (creating) the database state.db in dir.
func OpenStore(dir string) (*Store, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("create state directory: %w", err)
	}
	path := filepath.Join(dir, "state.db")
	// The timeout turns a second service on the same state into an error
	// rather than a hang on the file lock.
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: 2 * time.Second})
	if err != nil {
		return nil, fmt.Errorf("open state database %s: %w", path, err)
	}
	err = db.Update(func(tx *bolt.Tx) error {
		for _, b := range [][]byte{bucketOperations, bucketImages, bucketRepositories} {
			if _, err := tx.CreateBucketIfNotExists(b); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		db.Close()
		return nil, fmt.Errorf("initialize state database %s: %w", path, err)
	}
	return &Store{db: db}, nil
}

// Close closes the database.
func (s *Store) Close() error { return s.db.Close() }

func getOp(tx *bolt.Tx, id string) (*Operation, error) {
	b := tx.Bucket(bucketOperations).Get([]byte(id))
	if b == nil {
		return nil, fmt.Errorf("operation %q: %w", id, ErrNotFound)
	}
	var op Operation
	if err := json.Unmarshal(b, &op); err != nil {
		return nil, fmt.Errorf("decode operation %q: %w", id, err)
	}
	return &op, nil
}

func putOp(tx *bolt.Tx, op *Operation) error {
	b, err := json.Marshal(op)
	if err != nil {
		return fmt.Errorf("encode operation %s: %w", op.ID, err)
	}
	if err := tx.Bucket(bucketOperations).Put([]byte(op.ID), b); err != nil {
		return fmt.Errorf("store operation %s: %w", op.ID, err)
	}
	return nil
}

// Operation returns the operation id (ErrNotFound if none).
func (s *Store) Operation(id string) (*Operation, error) {
	var op *Operation
	err := s.db.View(func(tx *bolt.Tx) (err error) {
		op, err = getOp(tx, id)
		return err
	})
	return op, err
}

// Insert stores a new operation and makes it its image's newest. When
// skip is not nil and returns true for the image's current newest
// operation, nothing is stored and that operation is returned with false.
// The check and the insert are one transaction, so two concurrent inserts
// for one image never both pass.
func (s *Store) Insert(op *Operation, skip func(*Operation) bool) (*Operation, bool, error) {
	var existing *Operation
	err := s.db.Update(func(tx *bolt.Tx) error {
		key := []byte(op.ImageKey())
		if id := tx.Bucket(bucketImages).Get(key); id != nil && skip != nil {
			cur, err := getOp(tx, string(id))
			if err != nil && !errors.Is(err, ErrNotFound) {
				return err
			}
			if cur != nil && skip(cur) {
				existing = cur
				return nil
			}
		}
		if err := putOp(tx, op); err != nil {
			return err
		}
		return tx.Bucket(bucketImages).Put(key, []byte(op.ID))
	})
	if err != nil {
		return nil, false, err
	}
	if existing != nil {
		return existing, false, nil
	}
	return op, true, nil
}

// Update applies fn to operation id in one transaction and returns the
// stored result. fn's error aborts the change.
func (s *Store) Update(id string, fn func(*Operation) error) (*Operation, error) {
	var op *Operation
	err := s.db.Update(func(tx *bolt.Tx) error {
		var err error
		if op, err = getOp(tx, id); err != nil {
			return err
		}
		if err := fn(op); err != nil {
			return err
		}
		return putOp(tx, op)
	})
	if err != nil {
		return nil, err
	}
	return op, nil
}

// LatestForImage returns the newest operation for "host/repo@digest".
func (s *Store) LatestForImage(key string) (*Operation, error) {
	var op *Operation
	err := s.db.View(func(tx *bolt.Tx) (err error) {
		id := tx.Bucket(bucketImages).Get([]byte(key))
		if id == nil {
			return fmt.Errorf("operation for image %s: %w", key, ErrNotFound)
		}
		op, err = getOp(tx, string(id))
		return err
	})
	return op, err
}

// Operations returns the operations keep accepts (all for nil), newest
// first.
func (s *Store) Operations(keep func(*Operation) bool) ([]*Operation, error) {
	var out []*Operation
	err := s.db.View(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketOperations).ForEach(func(k, v []byte) error {
			var op Operation
			if err := json.Unmarshal(v, &op); err != nil {
				return fmt.Errorf("decode operation %q: %w", k, err)
			}
			if keep == nil || keep(&op) {
				out = append(out, &op)
			}
			return nil
		})
	})
	sort.SliceStable(out, func(i, j int) bool {
		if !out[i].Created.Equal(out[j].Created) {
			return out[i].Created.After(out[j].Created)
		}
		return out[i].ID > out[j].ID
	})
	return out, err
}

// SetRepository stores a repository's setting.
func (s *Store) SetRepository(r Repository) error {
	r.Images = nil
	b, err := json.Marshal(r)
	if err != nil {
		return fmt.Errorf("encode repository %s: %w", r.Name, err)
	}
	return s.db.Update(func(tx *bolt.Tx) error {
		if err := tx.Bucket(bucketRepositories).Put([]byte(r.Name), b); err != nil {
			return fmt.Errorf("store repository %s: %w", r.Name, err)
		}
		return nil
	})
}

// Repository returns name's setting; a repository never configured is
// returned with Streaming false.
func (s *Store) Repository(name string) (Repository, error) {
	r := Repository{Name: name}
	err := s.db.View(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketRepositories).Get([]byte(name))
		if b == nil {
			return nil
		}
		if err := json.Unmarshal(b, &r); err != nil {
			return fmt.Errorf("decode repository %s: %w", name, err)
		}
		return nil
	})
	return r, err
}

// Repositories returns every configured repository, by name.
func (s *Store) Repositories() ([]Repository, error) {
	var out []Repository
	err := s.db.View(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketRepositories).ForEach(func(k, v []byte) error {
			var r Repository
			if err := json.Unmarshal(v, &r); err != nil {
				return fmt.Errorf("decode repository %s: %w", k, err)
			}
			out = append(out, r)
			return nil
		})
	})
	return out, err
}
