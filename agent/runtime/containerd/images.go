package containerd

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/containerd/containerd"
	"github.com/containerd/containerd/errdefs"
	"github.com/containerd/containerd/events"
	remotedocker "github.com/containerd/containerd/remotes/docker"
	"github.com/distribution/reference"
	"github.com/opencontainers/go-digest"
	"github.com/opencontainers/image-spec/identity"

	"github.com/sandboxhq/sandbox"
)

// imageCache holds what Start needs from each image: the snapshot its views
// are made from and what the spec takes from its config. Entries are
// trusted without asking containerd while the image watch runs; without it
// each Start checks the name still points at the cached digest.
type imageCache struct {
	// unpackMu serialises the rare misses, so an image is unpacked once
	// even when many containers of it start together; pullMu does the same
	// for pulls.
	unpackMu sync.Mutex
	pullMu   sync.Mutex
	mu       sync.Mutex
	byName   map[string]cachedImage
	// watching is true while the watch follows containerd's image events.
	watching bool
	// gen counts resets, so that an image looked up before a reset is not
	// cached after it.
	gen uint64
}

// cachedImage is an image known to be unpacked in the snapshotter.
type cachedImage struct {
	target  digest.Digest // manifest (or index) digest the name pointed at
	chainID string        // the unpacked snapshot the views are made from
	info    imageInfo
}

// get returns the entry for name, whether it can be used without a check,
// and the generation to pass to put.
func (c *imageCache) get(name string) (ci cachedImage, ok, trusted bool, gen uint64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	ci, ok = c.byName[name]
	return ci, ok, c.watching, c.gen
}

// put caches ci unless the cache was reset since gen was read.
func (c *imageCache) put(name string, ci cachedImage, gen uint64) {
	c.mu.Lock()
	if c.gen == gen {
		c.byName[name] = ci
	}
	c.mu.Unlock()
}

func (c *imageCache) forget(name string) {
	c.mu.Lock()
	delete(c.byName, name)
	c.mu.Unlock()
}

// reset forgets every image and records whether the watch runs.
func (c *imageCache) reset(watching bool) {
	c.mu.Lock()
	clear(c.byName)
	c.watching = watching
	c.gen++
	c.mu.Unlock()
}

// image returns the unpacked image, unpacking it on first use. While the
// watch runs a cached image costs nothing; otherwise the name is looked up
// and checked against the cached digest, so a rebuilt image is picked up.
func (r *Runtime) image(ctx context.Context, name string) (cachedImage, error) {
	ci, ok, trusted, gen := r.images.get(name)
	if ok && trusted {
		return ci, nil
	}
	img, err := r.client.GetImage(ctx, name)
	if errdefs.IsNotFound(err) {
		img, err = r.pull(ctx, name)
	}
	if err != nil {
		return cachedImage{}, fmt.Errorf("get image %s: %w", name, err)
	}
	target := img.Target().Digest
	if ok && ci.target == target {
		return ci, nil
	}

	r.images.unpackMu.Lock()
	defer r.images.unpackMu.Unlock()
	// Another Start may have unpacked it meanwhile.
	if ci, ok, _, _ := r.images.get(name); ok && ci.target == target {
		return ci, nil
	}
	unpacked, err := img.IsUnpacked(ctx, r.cfg.Snapshotter)
	if err != nil {
		return cachedImage{}, fmt.Errorf("check image %s is unpacked: %w", name, err)
	}
	if !unpacked {
		begin := time.Now()
		if err := img.Unpack(ctx, r.cfg.Snapshotter); err != nil {
			return cachedImage{}, fmt.Errorf("unpack image %s: %w", name, err)
		}
		r.log.Info("image unpacked", "image", name, "digest", target, "duration", time.Since(begin))
	}
	diffIDs, err := img.RootFS(ctx)
	if err != nil {
		return cachedImage{}, fmt.Errorf("read layers of image %s: %w", name, err)
	}
	conf, err := img.Spec(ctx)
	if err != nil {
		return cachedImage{}, fmt.Errorf("read config of image %s: %w", name, err)
	}
	info := imageInfo{pathEnv: defaultPath}
	info.args = append(append([]string(nil), conf.Config.Entrypoint...), conf.Config.Cmd...)
	for _, e := range conf.Config.Env {
		if strings.HasPrefix(e, "PATH=") {
			info.pathEnv = e
		}
	}
	ci = cachedImage{target: target, chainID: identity.ChainID(diffIDs).String(), info: info}
	r.images.put(name, ci, gen)
	return ci, nil
}

// pull fetches a missing image from its registry and unpacks it, once even
// when many starts want it together. Images named without a registry
// (localhost/..., the ones make images imports) are never pulled.
func (r *Runtime) pull(ctx context.Context, name string) (containerd.Image, error) {
	r.images.pullMu.Lock()
	defer r.images.pullMu.Unlock()
	if img, err := r.client.GetImage(ctx, name); err == nil {
		return img, nil // another start pulled it meanwhile
	}
	ref, err := reference.ParseNormalizedNamed(name)
	if err != nil {
		return nil, fmt.Errorf("%w: image %s is not a valid reference: %v", sandbox.ErrInvalidArgument, name, err)
	}
	host := reference.Domain(ref)
	if host == "localhost" {
		return nil, fmt.Errorf("%w: image %s is not in containerd namespace %s, and localhost/ names no registry to pull it from (build it with make images)",
			sandbox.ErrFailedPrecondition, name, r.cfg.Namespace)
	}
	resolver := remotedocker.NewResolver(remotedocker.ResolverOptions{Hosts: remotedocker.ConfigureDefaultRegistries(
		remotedocker.WithPlainHTTP(func(h string) (bool, error) {
			if local, _ := remotedocker.MatchLocalhost(h); local {
				return true, nil
			}
			return slices.Contains(r.cfg.PlainHTTPRegistries, h), nil
		}),
	)})
	begin := time.Now()
	r.log.Info("pulling image", "image", name, "registry", host)
	img, err := r.client.Pull(ctx, name, containerd.WithResolver(resolver), containerd.WithPullUnpack,
		containerd.WithPullSnapshotter(r.cfg.Snapshotter))
	if err != nil {
		if errdefs.IsNotFound(err) {
			return nil, fmt.Errorf("%w: image %s is neither in containerd namespace %s nor in registry %s", sandbox.ErrFailedPrecondition, name, r.cfg.Namespace, host)
		}
		return nil, fmt.Errorf("%w: pull image %s from %s: %v", sandbox.ErrUnavailable, name, host, err)
	}
	r.log.Info("image pulled", "image", name, "digest", img.Target().Digest, "duration", time.Since(begin))
	return img, nil
}

// watchImages follows containerd's image events in the adapter's namespace
// and empties the cache at each one (images change rarely; a miss costs one
// lookup), so Start need not look its image up. When the subscription
// breaks (containerd restarts), the cache is distrusted until it is back.
// It returns when ctx ends.
func (r *Runtime) watchImages(ctx context.Context) {
	defer close(r.watchDone)
	filter := fmt.Sprintf(`namespace==%q,topic~="^/images/"`, r.cfg.Namespace)
	const firstBackoff, maxBackoff = 100 * time.Millisecond, 5 * time.Second
	backoff := firstBackoff
	for {
		subscribed := time.Now()
		evs, errs := r.client.EventService().Subscribe(ctx, filter)
		// What was cached before the subscription may have changed unseen.
		r.images.reset(true)
		err := r.followImages(ctx, evs, errs)
		r.images.reset(false)
		if ctx.Err() != nil {
			return
		}
		if time.Since(subscribed) > maxBackoff {
			backoff = firstBackoff // it had worked for a while
		}
		r.log.Warn("image events lost; Start looks images up until they are back", "err", err, "retry_in", backoff)
		select {
		case <-ctx.Done():
			return
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, maxBackoff)
	}
}

// followImages empties the cache at every event until the subscription ends.
func (r *Runtime) followImages(ctx context.Context, evs <-chan *events.Envelope, errs <-chan error) error {
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case err := <-errs:
			return err
		case e := <-evs:
			r.log.Debug("image changed: cache emptied", "topic", e.Topic)
			r.images.reset(true)
		}
	}
}
