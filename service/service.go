package service

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"sync"
	"time"

	"github.com/containerd/log"
	"github.com/distribution/reference"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/streamer-dev/streamer/converter"
	"github.com/streamer-dev/streamer/fetcher"
)

// ConvertFunc converts an image; converter.Convert is the default.
type ConvertFunc func(ctx context.Context, c *fetcher.Client, ref fetcher.Ref, opts converter.Options) ([]converter.Result, error)

// Config configures a Service.
type Config struct {
	// StateDir holds the database and the converter's layer index.
	StateDir string
	// Workers is how many conversions run at once; default 2.
	Workers int
	// Token authenticates API requests (Authorization: Bearer TOKEN).
	Token string
	// WebhookSecret authenticates registry notifications
	// (Authorization: Bearer SECRET in the endpoint's headers).
	WebhookSecret string
	// Registry is the registry client (required).
	Registry *fetcher.Client
	// Deleter deletes manifests (streamer delete); nil disables deletes.
	Deleter Deleter
	// RegistryHost, when set, is the host used for every notification
	// instead of the event's request.host (a registry behind a proxy).
	RegistryHost string
	// Convert converts an image; default converter.Convert.
	Convert ConvertFunc
	// Layer tunes each layer's conversion.
	Layer converter.LayerOptions
	// ProgressInterval bounds how often byte progress is written to the
	// database; default 1 s. Layer starts and ends are always written.
	ProgressInterval time.Duration
}

// Service runs conversions as durable operations.
type Service struct {
	cfg   Config
	store *Store

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu      sync.Mutex
	queue   []string                      // operation ids, oldest first
	wake    chan struct{}                 // signalled when queue grows
	running map[string]context.CancelFunc // operation id -> its conversion's cancel
	live    map[string]*Operation         // running operations with fresh progress
}

// New opens the state in cfg.StateDir. Start begins converting.
func New(cfg Config) (*Service, error) {
	if cfg.Registry == nil {
		return nil, fmt.Errorf("service: a registry client is required")
	}
	if cfg.Token == "" || cfg.WebhookSecret == "" {
		return nil, fmt.Errorf("service: both an API token and a webhook secret are required")
	}
	if cfg.Workers <= 0 {
		cfg.Workers = 2
	}
	if cfg.Convert == nil {
		cfg.Convert = converter.Convert
	}
	if cfg.ProgressInterval <= 0 {
		cfg.ProgressInterval = time.Second
	}
	st, err := OpenStore(cfg.StateDir)
	if err != nil {
		return nil, err
	}
	return &Service{
		cfg: cfg, store: st,
		wake:    make(chan struct{}, 1),
		running: map[string]context.CancelFunc{},
		live:    map[string]*Operation{},
	}, nil
}

// Store is the service's database.
func (s *Service) Store() *Store { return s.store }

// Start re-queues what a previous run left (running operations are retried:
// conversion is idempotent) and starts the workers. Close stops them.
func (s *Service) Start(ctx context.Context) error {
	s.ctx, s.cancel = context.WithCancel(context.WithoutCancel(ctx))
	ops, err := s.store.Operations(func(o *Operation) bool { return o.State.Active() })
	if err != nil {
		return fmt.Errorf("load operations: %w", err)
	}
	// Oldest first, as they were queued.
	for i := len(ops) - 1; i >= 0; i-- {
		op := ops[i]
		if op.State == Running {
			now := time.Now().UTC()
			if _, err := s.store.Update(op.ID, func(o *Operation) error { return o.move(Queued, now) }); err != nil {
				return fmt.Errorf("requeue operation %s: %w", op.ID, err)
			}
			log.G(ctx).WithFields(log.Fields{"op": op.ID, "image": op.ImageKey()}).Info("operation interrupted by a restart, queued again")
		}
		s.push(op.ID)
	}
	for i := 0; i < s.cfg.Workers; i++ {
		s.wg.Add(1)
		go s.worker()
	}
	log.G(ctx).WithFields(log.Fields{"workers": s.cfg.Workers, "requeued": len(ops)}).Info("conversion service started")
	return nil
}

// Close stops the workers (running conversions are cancelled and stay
// "running" in the database, so the next Start retries them) and closes
// the database.
func (s *Service) Close() error {
	if s.cancel != nil {
		s.cancel()
		s.wg.Wait()
	}
	return s.store.Close()
}

func (s *Service) push(id string) {
	s.mu.Lock()
	s.queue = append(s.queue, id)
	s.mu.Unlock()
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

func (s *Service) pop() (string, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.queue) == 0 {
		return "", false
	}
	id := s.queue[0]
	s.queue = s.queue[1:]
	if len(s.queue) > 0 {
		// Another worker may be waiting for what is left.
		select {
		case s.wake <- struct{}{}:
		default:
		}
	}
	return id, true
}

func (s *Service) worker() {
	defer s.wg.Done()
	for {
		id, ok := s.pop()
		if !ok {
			select {
			case <-s.ctx.Done():
				return
			case <-s.wake:
				continue
			}
		}
		if s.ctx.Err() != nil {
			return
		}
		s.run(id)
	}
}

// NormalizeRepository validates a repository name as the registry would
// ("host/path", lower case, at most 255 characters, no tag or digest) and
// returns its normalized form.
func NormalizeRepository(name string) (string, error) {
	named, err := reference.ParseNormalizedNamed(name)
	if err != nil {
		return "", fmt.Errorf("repository name %q: %w: %v", name, ErrInvalid, err)
	}
	if !reference.IsNameOnly(named) {
		return "", fmt.Errorf("repository name %q: %w: a repository has no tag or digest", name, ErrInvalid)
	}
	return named.Name(), nil
}

// parseImage parses an image reference, mapping errors to ErrInvalid.
func parseImage(image string) (fetcher.Ref, error) {
	if image == "" {
		return fetcher.Ref{}, fmt.Errorf("image: %w: empty reference", ErrInvalid)
	}
	ref, err := fetcher.ParseRef(image)
	if err != nil {
		return ref, fmt.Errorf("%w: %v", ErrInvalid, err)
	}
	return ref, nil
}

// registryError maps fetcher errors to the service's kinds, keeping both.
func registryError(err error) error {
	switch {
	case errors.Is(err, fetcher.ErrNotFound):
		return fmt.Errorf("%w: %w", ErrNotFound, err)
	case errors.Is(err, fetcher.ErrUnreachable):
		return fmt.Errorf("%w: %w", ErrUnavailable, err)
	}
	return err
}

// resolve resolves image to its manifest descriptor.
func (s *Service) resolve(ctx context.Context, image string) (fetcher.Ref, ocispec.Descriptor, error) {
	ref, err := parseImage(image)
	if err != nil {
		return ref, ocispec.Descriptor{}, err
	}
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	desc, err := s.cfg.Registry.Resolve(ctx, ref)
	if err != nil {
		return ref, desc, fmt.Errorf("resolve image %s: %w", ref, registryError(err))
	}
	return ref, desc, nil
}

// Create starts an operation converting image (resolved to its digest now).
// When the image already has a queued or running operation, that one is
// returned with created false.
func (s *Service) Create(ctx context.Context, image string) (*Operation, bool, error) {
	ref, desc, err := s.resolve(ctx, image)
	if err != nil {
		return nil, false, err
	}
	return s.enqueue(ctx, ref, desc, SourceAPI, func(cur *Operation) bool { return cur.State.Active() })
}

func (s *Service) enqueue(ctx context.Context, ref fetcher.Ref, desc ocispec.Descriptor, source string, skip func(*Operation) bool) (*Operation, bool, error) {
	id, err := newID()
	if err != nil {
		return nil, false, err
	}
	now := time.Now().UTC()
	op := &Operation{
		ID: id, Image: ref.String(), Repository: ref.Name(), Digest: desc.Digest, MediaType: desc.MediaType,
		Source: source, State: Queued, Created: now, Updated: now,
	}
	got, created, err := s.store.Insert(op, skip)
	if err != nil {
		return nil, false, err
	}
	if created {
		s.push(got.ID)
		log.G(ctx).WithFields(log.Fields{"op": got.ID, "image": got.Image, "digest": got.Digest, "source": source}).Info("operation queued")
	}
	return got, created, nil
}

// Operation returns operation id with its latest progress.
func (s *Service) Operation(id string) (*Operation, error) {
	s.mu.Lock()
	if op, ok := s.live[id]; ok {
		c := op.clone()
		s.mu.Unlock()
		return c, nil
	}
	s.mu.Unlock()
	return s.store.Operation(id)
}

// ForImage returns the operations for image, newest first. A tag is
// resolved first; operations created for the tag are found even when the
// registry no longer has it.
func (s *Service) ForImage(ctx context.Context, image string) ([]*Operation, error) {
	ref, err := parseImage(image)
	if err != nil {
		return nil, err
	}
	var want string
	if ref.Digest == "" {
		rctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		desc, err := s.cfg.Registry.Resolve(rctx, ref)
		cancel()
		if err == nil {
			want = imageKey(ref.Name(), desc.Digest)
		}
	} else {
		want = imageKey(ref.Name(), ref.Digest)
	}
	ops, err := s.store.Operations(func(o *Operation) bool {
		return o.ImageKey() == want || (want == "" && o.Image == ref.String())
	})
	if err != nil {
		return nil, err
	}
	if len(ops) == 0 {
		return nil, fmt.Errorf("operations for image %s: %w", ref, ErrNotFound)
	}
	for i, op := range ops {
		if live, err := s.Operation(op.ID); err == nil {
			ops[i] = live
		}
	}
	return ops, nil
}

// Cancel stops operation id: a queued one is canceled at once, a running
// one's conversion context is cancelled and the worker records canceled
// when the conversion returns. The artifact manifest is pushed only after
// every blob, so a cancelled conversion leaves no referenced artifact.
func (s *Service) Cancel(ctx context.Context, id string) (*Operation, error) {
	now := time.Now().UTC()
	s.mu.Lock()
	defer s.mu.Unlock()
	op, err := s.store.Update(id, func(o *Operation) error {
		switch o.State {
		case Queued:
			return o.move(Canceled, now)
		case Running:
			o.CancelRequested = true
			o.Updated = now
			return nil
		}
		return fmt.Errorf("operation %s is already %s: %w", id, o.State, ErrConflict)
	})
	if err != nil {
		return nil, err
	}
	if cancel, ok := s.running[id]; ok {
		cancel()
		if live, ok := s.live[id]; ok {
			live.CancelRequested = true
		}
	}
	log.G(ctx).WithFields(log.Fields{"op": id, "image": op.ImageKey(), "state": op.State}).Info("operation cancel requested")
	return op, nil
}

// run executes one operation.
func (s *Service) run(id string) {
	now := time.Now().UTC()
	ctx, cancel := context.WithCancel(s.ctx)
	defer cancel()
	s.mu.Lock()
	op, err := s.store.Update(id, func(o *Operation) error {
		if o.State != Queued {
			return errSkip
		}
		o.Layers = nil
		return o.move(Running, now)
	})
	if err == nil {
		s.running[id] = cancel
		s.live[id] = op.clone()
	}
	s.mu.Unlock()
	l := log.G(ctx).WithFields(log.Fields{"op": id})
	if err != nil {
		if !errors.Is(err, errSkip) {
			l.WithError(err).Error("start operation")
		}
		return
	}
	l = l.WithFields(log.Fields{"image": op.Image, "digest": op.Digest, "attempt": op.Attempts})
	l.Info("operation running")

	ref, perr := fetcher.ParseRef(op.Image)
	if perr != nil {
		ref = fetcher.Ref{}
	}
	ref = ref.WithDigest(op.Digest)
	p := &progress{s: s, id: id}
	opts := converter.Options{
		Layer:    s.cfg.Layer,
		CacheDir: filepath.Join(s.cfg.StateDir, "cache"),
		Progress: p.callbacks(),
	}
	var results []converter.Result
	if perr != nil {
		err = fmt.Errorf("image %q: %w", op.Image, perr)
	} else {
		results, err = s.cfg.Convert(ctx, s.cfg.Registry, ref, opts)
	}

	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.running, id)
	live := s.live[id]
	delete(s.live, id)
	if s.ctx.Err() != nil {
		// Shutting down: leave the operation running; the next start
		// retries it.
		l.Info("operation interrupted by shutdown")
		return
	}
	end := time.Now().UTC()
	final, uerr := s.store.Update(id, func(o *Operation) error {
		if live != nil {
			o.Layers = live.Layers
		}
		switch {
		case err == nil:
			for _, r := range results {
				o.Results = append(o.Results, Result{Platform: r.Platform, Subject: r.Subject.Digest, Artifact: r.Artifact.Digest, Existing: r.Existing})
			}
			if len(o.Results) > 0 {
				o.Artifact = o.Results[0].Artifact
			}
			return o.move(Succeeded, end)
		case o.CancelRequested && ctx.Err() != nil:
			o.Error = "canceled"
			return o.move(Canceled, end)
		default:
			o.Error = oneLine(err.Error())
			return o.move(Failed, end)
		}
	})
	if uerr != nil {
		l.WithError(uerr).Error("record operation result")
		return
	}
	l = l.WithFields(log.Fields{"state": final.State, "elapsed": end.Sub(now).Round(time.Millisecond)})
	if final.State == Failed {
		l.WithError(err).Warn("operation failed")
	} else {
		l.WithField("artifact", final.Artifact).Info("operation finished")
	}
}

var errSkip = errors.New("operation not queued")

// progress records converter events into the live operation and, now and
// then, the database.
type progress struct {
	s         *Service
	id        string
	lastWrite time.Time
}

func (p *progress) update(ev converter.LayerEvent, fn func(*LayerProgress), persist bool) {
	p.s.mu.Lock()
	op, ok := p.s.live[p.id]
	if !ok {
		p.s.mu.Unlock()
		return
	}
	var lp *LayerProgress
	for i := range op.Layers {
		if op.Layers[i].Layer == ev.Layer && op.Layers[i].Platform == ev.Platform {
			lp = &op.Layers[i]
		}
	}
	if lp == nil {
		op.Layers = append(op.Layers, LayerProgress{Platform: ev.Platform, Index: ev.Index, Count: ev.Count, Layer: ev.Layer, Size: ev.Size})
		lp = &op.Layers[len(op.Layers)-1]
	}
	lp.Bytes = ev.Bytes
	fn(lp)
	op.Updated = time.Now().UTC()
	layers := append([]LayerProgress(nil), op.Layers...)
	p.s.mu.Unlock()
	if !persist && time.Since(p.lastWrite) < p.s.cfg.ProgressInterval {
		return
	}
	p.lastWrite = time.Now()
	_, err := p.s.store.Update(p.id, func(o *Operation) error {
		if o.State != Running {
			return errSkip
		}
		o.Layers = layers
		return nil
	})
	if err != nil && !errors.Is(err, errSkip) {
		log.L.WithError(err).WithField("op", p.id).Warn("record progress")
	}
}

func (p *progress) callbacks() converter.Progress {
	return converter.Progress{
		Start: func(ev converter.LayerEvent) { p.update(ev, func(*LayerProgress) {}, true) },
		Bytes: func(ev converter.LayerEvent) { p.update(ev, func(*LayerProgress) {}, false) },
		Done: func(ev converter.LayerEvent, _ converter.LayerReport) {
			p.update(ev, func(l *LayerProgress) { l.Done = true }, true)
		},
		Reused: func(ev converter.LayerEvent, _ converter.LayerReport) {
			p.update(ev, func(l *LayerProgress) { l.Done, l.Reused = true, true }, true)
		},
	}
}
